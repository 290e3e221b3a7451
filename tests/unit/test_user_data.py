"""user_data parsing: scripts, #cloud-config, and the errors a client sees (400 + message)."""

from __future__ import annotations

import pytest

from hatchvm.images.disk import MAX_USER_DATA, GuestSeed, parse_user_data
from hatchvm.images.errors import UserDataError

KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb3xTmTSjXXK0m7aSbKz6qB7v8k7k5z8cZt9bJ7yX3Q one@host"
KEY2 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 two@host"


@pytest.mark.parametrize("empty", [None, "", "   \n\n"])
def test_empty_user_data_seeds_nothing(empty: str | None) -> None:
    assert parse_user_data(empty) == GuestSeed()


def test_shell_script_is_kept_verbatim() -> None:
    script = "#!/bin/sh\necho hi > /tmp/x\n"
    seed = parse_user_data(script)
    assert seed.script == script
    assert seed.ssh_keys == []


def test_shell_script_key_comments_add_keys() -> None:
    script = f"#!/bin/sh\n# ssh-authorized-key: {KEY1}\n  # ssh-authorized-key:   {KEY2}\necho\n"
    seed = parse_user_data(script)
    assert seed.ssh_keys == [KEY1, KEY2]
    assert seed.script == script


def test_shell_script_with_bad_key_comment_is_refused() -> None:
    with pytest.raises(UserDataError, match="user_data: not an SSH public key"):
        parse_user_data("#!/bin/sh\n# ssh-authorized-key: hello world\n")


def test_cloud_config_keys_and_runcmd() -> None:
    seed = parse_user_data(
        "#cloud-config\n"
        f"ssh_authorized_keys:\n  - {KEY1}\n  - {KEY2}\n"
        "runcmd:\n"
        "  - echo hello > /tmp/hello\n"
        "  - [busybox, httpd, -p, '8080', -h, /srv/my www]\n"
    )
    assert seed.ssh_keys == [KEY1, KEY2]
    assert seed.script == (
        "#!/bin/sh\necho hello > /tmp/hello\nbusybox httpd -p 8080 -h '/srv/my www'\n"
    )


def test_cloud_config_keys_only_has_no_script() -> None:
    seed = parse_user_data(f"#cloud-config\nssh_authorized_keys: [{KEY1!r}]\n")
    assert seed.script is None
    assert seed.ssh_keys == [KEY1]


def test_empty_cloud_config_is_fine() -> None:
    assert parse_user_data("#cloud-config\n") == GuestSeed()


def test_unknown_cloud_config_key_is_named() -> None:
    with pytest.raises(UserDataError, match="user_data: unsupported cloud-config key 'packages'"):
        parse_user_data("#cloud-config\npackages: [nginx]\nruncmd: [ls]\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("#cloud-config\nruncmd: ls\n", "runcmd must be a list"),
        ("#cloud-config\nruncmd:\n  - {a: 1}\n", "runcmd entries must be strings"),
        ("#cloud-config\nruncmd:\n  - [ls, 3]\n", "runcmd entries must be strings"),
        ("#cloud-config\nssh_authorized_keys: abc\n", "ssh_authorized_keys must be a list"),
        ("#cloud-config\nssh_authorized_keys: [not-a-key]\n", "not an SSH public key"),
        ("#cloud-config\n- a\n- b\n", "cloud-config must be a YAML mapping"),
        ("#cloud-config\nruncmd: [unclosed\n", "invalid cloud-config YAML"),
    ],
)
def test_bad_cloud_config(text: str, message: str) -> None:
    with pytest.raises(UserDataError, match=message) as info:
        parse_user_data(text)
    assert info.value.message.startswith("user_data: ")


@pytest.mark.parametrize("text", ["echo hi\n", "hello", "# just a comment\n", " #!/bin/sh\n"])
def test_other_text_is_refused(text: str) -> None:
    with pytest.raises(UserDataError) as info:
        parse_user_data(text)
    assert info.value.message == (
        "user_data: must be a shell script starting with #! or #cloud-config"
    )


def test_size_limit() -> None:
    header = "#!/bin/sh\n"
    ok = header + "#" * (MAX_USER_DATA - len(header))
    assert parse_user_data(ok).script == ok
    with pytest.raises(UserDataError, match="user_data: larger than 64 KiB"):
        parse_user_data(ok + "#")


def test_size_limit_counts_bytes_not_characters() -> None:
    text = "#!/bin/sh\n# " + "é" * (MAX_USER_DATA // 2)
    with pytest.raises(UserDataError, match="larger than 64 KiB"):
        parse_user_data(text)


def test_nul_bytes_are_refused() -> None:
    with pytest.raises(UserDataError, match="NUL"):
        parse_user_data("#!/bin/sh\necho \x00\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # YAML escapes spell what the JSON body could not carry: a NUL, a lone surrogate.
        ('#cloud-config\nruncmd: ["echo \\0"]\n', "user_data: must not contain NUL bytes"),
        ('#cloud-config\nruncmd: ["\\ud800"]\n', "user_data: must not contain lone surrogates"),
        # Aliases repeat a 50 KB entry 1000 times: 50 MB from 64 KiB of YAML.
        (
            "#cloud-config\nruncmd:\n - &a " + "y" * 50_000 + "\n" + " - *a\n" * 1000,
            "user_data: runcmd expands to over 256 KiB",
        ),
        (
            "#cloud-config\nssh_authorized_keys:\n - &k ssh-ed25519 " + "A" * 50_000 + "\n"
            + " - *k\n" * 1000,
            "user_data: ssh_authorized_keys expand to over 256 KiB",
        ),
    ],
)  # fmt: skip
def test_what_yaml_makes_of_cloud_config_is_checked(text: str, message: str) -> None:
    """Regressions: each of these used to pass validation and fail later, creating the VM
    (a 500 and a VM in error: the disk could not hold the file, or no file the surrogate)."""
    assert len(text.encode()) <= MAX_USER_DATA
    with pytest.raises(UserDataError, match=message):
        parse_user_data(text)


def test_large_cloud_config_within_the_limit_is_fine() -> None:
    words = ["echo", "it's"] * 4000  # shlex quoting makes it longer than the YAML
    text = "#cloud-config\nruncmd:\n - [" + ", ".join(f'"{w}"' for w in words) + "]\n"
    assert len(text.encode()) <= MAX_USER_DATA
    assert parse_user_data(text).script.startswith("#!/bin/sh\necho 'it'\"'\"'s' echo")
