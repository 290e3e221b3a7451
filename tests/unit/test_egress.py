"""The egress policy's nft sets: merged networks, the default deny list."""

from ipaddress import IPv4Address, IPv4Network, ip_address

from hatchvm.net.egress import DEFAULT_DENIED, nft_elements


def test_elements_are_merged_for_an_interval_set() -> None:
    nets = [IPv4Network("10.0.0.0/8"), IPv4Network("10.1.0.0/16"), IPv4Address("1.1.1.1")]
    assert nft_elements(nets) == "elements = { 1.1.1.1/32, 10.0.0.0/8 }"
    assert nft_elements([]) == ""


def test_default_deny_list() -> None:
    def denied(address: str) -> bool:
        return any(ip_address(address) in net for net in DEFAULT_DENIED)

    for address in (
        "0.0.0.1", "10.2.3.4", "100.64.0.1", "100.127.255.254", "127.0.0.1", "169.254.169.254",
        "172.16.0.1", "172.31.255.254", "192.168.1.1", "224.0.0.251", "239.255.255.250",
        "240.0.0.1", "255.255.255.255",
    ):  # fmt: skip
        assert denied(address), address
    for address in ("1.1.1.1", "8.8.8.8", "100.128.0.1", "172.32.0.1", "203.0.113.10"):
        assert not denied(address), address
