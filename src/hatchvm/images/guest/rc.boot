#!/bin/sh
# Early boot (busybox init "sysinit"): filesystems, hostname, network from the kernel command
# line (hatch.hostname=, hatch.ip=<addr>/<prefixlen>, hatch.gw=, hatch.dns=), SSH host keys.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mkdir -p /var/log /var/run /root /etc/dropbear
chmod 0700 /root

arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }

name=$(arg hatch.hostname)
[ -n "$name" ] || name=$(cat /etc/hostname 2>/dev/null)
[ -n "$name" ] || name=hatchvm
hostname "$name"
[ "$(cat /etc/hostname 2>/dev/null)" = "$name" ] || echo "$name" > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost\n' "$name" > /etc/hosts

ip link set lo up
addr=$(arg hatch.ip)
if [ -n "$addr" ]; then
  if ip link show eth0 > /dev/null 2>&1; then
    ip addr add "$addr" dev eth0 && ip link set eth0 up
    gw=$(arg hatch.gw)
    [ -n "$gw" ] && ip route add default via "$gw" dev eth0
  else
    echo "hatchvm: hatch.ip=$addr given but there is no eth0" > /dev/console
  fi
fi
dns=$(arg hatch.dns)
if [ -n "$dns" ]; then
  : > /etc/resolv.conf
  for d in $(echo "$dns" | tr ',' ' '); do echo "nameserver $d" >> /etc/resolv.conf; done
fi

# SSH host keys: made once, on the first boot; /etc/dropbear lives on the writable disk, so
# they stay the same across reboots, stops and snapshots.
for t in ed25519 ecdsa; do
  k=/etc/dropbear/dropbear_${t}_host_key
  [ -s "$k" ] || dropbearkey -t "$t" -f "$k" > /dev/null 2>&1
done
mkdir -p /root/.ssh
chmod 0700 /root/.ssh
