"""hatchd's side of the guest agent: the wire protocol (protocol.py, messages.py), one channel
per VM over its virtio-serial port (channel.py), and the registry core uses (agents.py). The
guest's side is images/guest/agent/hatch-agent.c; docs/agent-protocol.md describes both."""
