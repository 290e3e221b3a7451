"""Every cell of the transition table."""

import pytest

from hatchvm.core.states import ALLOWED, Op, State, guard
from hatchvm.errors import Conflict

CELLS = [(op, state) for op in Op for state in State]


@pytest.mark.parametrize(("op", "state"), CELLS)
def test_guard_matches_table(op: Op, state: State) -> None:
    if state in ALLOWED[op]:
        guard(op, state.value)
    else:
        with pytest.raises(Conflict) as err:
            guard(op, state.value)
        assert err.value.message.startswith(f"vm is {state.value}, must be ")


def test_contract_examples() -> None:
    with pytest.raises(Conflict, match=r"^vm is stopped, must be running$"):
        guard(Op.STOP, "stopped")
    with pytest.raises(Conflict, match=r"^vm is running, must be stopped$"):
        guard(Op.START, "running")
    with pytest.raises(Conflict, match=r"^vm is running, must be snapshotted$"):
        guard(Op.RESTORE, "running")
