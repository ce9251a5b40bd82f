#!/bin/busybox sh
# /init of a tmdht network-lab guest (busybox, the virtio-net modules and vnetprobe).
#
# Reads `tmdht.ip=A.B.C.D/N` from /proc/cmdline, loads the virtio NIC driver, brings eth0 up
# with that address, starts `vnetprobe udp-echo 9000` and `vnetprobe tcp-sink 5001`, prints
# `tmdht-ready net ip=...` and then `tmdht-counter N` once a second (like the lab's other
# guests: a guest resumed after a migration continues it).
#
# Commands come in on the serial console, one per line: `tmdht-run ID COMMAND...` runs COMMAND
# between `tmdht-begin ID` and `tmdht-done ID RC` on the console.

/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=16m tmpfs /tmp
exec </dev/null >/dev/ttyS0 2>&1

IP=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tmdht.ip=*) IP="${arg#*=}" ;;
    esac
done
[ -n "$IP" ] || { echo "tmdht-error no tmdht.ip= on the kernel command line"; exit 1; }

for module in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci \
              failover net_failover virtio_net; do
    insmod "/lib/modules/$module.ko" || { echo "tmdht-error insmod $module failed"; exit 1; }
done
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do
    usleep 50000
    n=$((n + 1))
done
[ -e /sys/class/net/eth0 ] || { echo "tmdht-error no eth0"; exit 1; }
ip link set lo up
ip link set eth0 up
ip addr add "$IP" dev eth0

/bin/vnetprobe udp-echo 9000 &
/bin/vnetprobe tcp-sink 5001 &
echo "tmdht-ready net ip=$IP mac=$(cat /sys/class/net/eth0/address)"

(
    i=0
    while :; do
        echo "tmdht-counter $i"
        i=$((i + 1))
        sleep 1
    done
) &

stty -F /dev/ttyS0 -echo 2>/dev/null
while :; do
    while read -r tag id command; do
        [ "$tag" = tmdht-run ] || continue
        echo "tmdht-begin $id"
        sh -c "$command"
        echo "tmdht-done $id $?"
    done </dev/ttyS0
done
