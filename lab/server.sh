#!/bin/busybox sh
# /init-server of a tmdht lab "server" guest (rdinit=/init-server; busybox only, runs as PID 1).
#
# Fills memory the way a server's looks, then prints `tmdht-counter N` once a second like /init:
# - the distribution: the host's libraries and programs baked into the initramfs under
#   /usr/lib/tmdht-dist (the files every server of a fleet shares; resident in the rootfs);
# - data files: random binary data and base64 text (unique to this guest, new every boot);
# - a heap of repeated data: one random block many times over, and a one-byte fill pattern;
# - a working set the dirtier rewrites (below; a quarter of the available memory, at most
#   256 MiB), and free memory (zero pages).
# Sizes are shares of MemAvailable after boot, so a 128 MiB and a 1 GiB guest look alike.
#
# With `tmdht.dirty=N` (MiB/s) a dirtier keeps overwriting the working set with fresh content at
# N MiB/s: windows of a random pool at a byte offset that is never a multiple of the page size
# and changes every pass, so no page it writes equals a page sent before (no delta encoding,
# back-reference or template can shortcut it). It paces itself on /proc/uptime and prints
# `tmdht-dirtied mib=M cs=T` (MiB written by T hundredths of a second of uptime) every 5 s.

/bin/busybox mkdir -p /proc /sys /dev /tmp /srv /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=48m tmpfs /tmp
mount -t tmpfs -o size=95% tmpfs /srv
exec </dev/null >/dev/ttyS0 2>&1

SEED=0
DIRTY=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tmdht.seed=*) SEED="${arg#*=}" ;;
        tmdht.dirty=*) DIRTY="${arg#*=}" ;;
    esac
done
for value in "$SEED" "$DIRTY"; do
    case "$value" in
        '' | *[!0-9]*) echo "tmdht-error bad number '$value'"; exit 1 ;;
    esac
done

# uptime_cs: seconds since boot in hundredths.
uptime_cs() {
    read -r up _ < /proc/uptime
    echo "${up%.*}${up#*.}"
}

# mib FILE MIB SOURCE: FILE gets MIB MiB read from SOURCE.
mib() {
    dd if="$3" of="$1" bs=1048576 count="$2" iflag=fullblock 2>/dev/null
}

started=$(uptime_cs)
avail=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
share() {
    echo $((avail * $1 / 100))
}
d=/srv
mib "$d/data.bin" "$(share 20)" /dev/urandom
head -c $(($(share 6) * 1048576)) /dev/urandom | base64 > "$d/data.txt"
mib "$d/block.bin" 1 /dev/urandom
i=0
while [ $i -lt "$(share 12)" ]; do
    cat "$d/block.bin"
    i=$((i + 1))
done > "$d/repeated.bin"
fill=$(printf '%03o' $((SEED % 200 + 40)))
head -c $(($(share 4) * 1048576)) /dev/zero | tr '\000' "\\$fill" > "$d/fill.bin"
POOL_MIB=8
[ "$avail" -lt 256 ] && POOL_MIB=4
mib "$d/pool.bin" "$POOL_MIB" /dev/urandom
WORKING_MIB=$(share 25)
[ "$WORKING_MIB" -gt 256 ] && WORKING_MIB=256
[ "$WORKING_MIB" -lt 4 ] && WORKING_MIB=4
mib "$d/working.bin" "$WORKING_MIB" /dev/urandom
filled=$(du -sm "$d" | awk '{ print $1 }')

# dirty_loop: overwrite working.bin with fresh content at $DIRTY MiB/s, forever.
dirty_loop() {
    blocks=$((WORKING_MIB * 16))          # 64 KiB blocks in the working set
    pool_blocks=$((POOL_MIB * 16 - 1))    # whole blocks readable at any offset < 64 KiB
    shift=2
    pos=0
    src=0
    written=0
    t0=$(uptime_cs)
    report=$t0
    while :; do
        now=$(uptime_cs)
        if [ $now -ge $report ]; then   # what it achieved, for whoever checks the pace
            echo "tmdht-dirtied mib=$((written / 16)) cs=$now" > /dev/ttyS0
            report=$((report + 500))
        fi
        due=$(((now - t0) * DIRTY * 16 / 100))
        n=$((due - written))
        if [ $n -le 0 ]; then
            usleep 20000
            continue
        fi
        [ $n -gt 32 ] && n=32
        [ $n -gt $((blocks - pos)) ] && n=$((blocks - pos))
        [ $n -gt $((pool_blocks - src)) ] && n=$((pool_blocks - src))
        dd if="$d/pool.bin" of="$d/working.bin" bs=65536 count=$n \
            skip=$((src * 65536 + shift)) iflag=skip_bytes seek=$pos conv=notrunc 2>/dev/null
        written=$((written + n))
        pos=$(((pos + n) % blocks))
        src=$((src + n))
        if [ $src -ge $pool_blocks ]; then
            src=0
            shift=$((shift % 4095 + 1))   # 1..4095: never page aligned, new every pass
        fi
    done
}

if [ "$DIRTY" -gt 0 ]; then
    dirty_loop </dev/null >/dev/null 2>&1 &
fi
echo "tmdht-ready workload=server seed=$SEED dirty=$DIRTY filled_mib=$filled" \
    "available_mib=$avail working_mib=$WORKING_MIB fill_cs=$(($(uptime_cs) - started))"

i=0
while :; do
    echo "tmdht-counter $i"
    i=$((i + 1))
    sleep 1
done
