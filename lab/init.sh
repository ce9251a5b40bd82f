#!/bin/busybox sh
# /init of a tmdht lab guest (busybox only, runs as PID 1 from the initramfs).
#
# Reads `tmdht.workload=NAME tmdht.seed=N` from /proc/cmdline, starts the workload in the
# background, then prints `tmdht-counter N` on the serial console once a second forever. The
# counter lives in this shell's memory, so a guest resumed after a migration continues it: that is
# how the lab proves a guest came back alive with its memory.
#
# The workloads make guests differ the way real VMs do: unique random pages, pages of text and
# data derived from the seed, fill patterns, the same binary as in every other guest (busybox
# stands in for shared libraries), page cache, anonymous heap and pages dirtied while migrating.

/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=48m tmpfs /tmp
exec </dev/null >/dev/ttyS0 2>&1

WORKLOAD=idle
SEED=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tmdht.workload=*) WORKLOAD="${arg#*=}" ;;
        tmdht.seed=*) SEED="${arg#*=}" ;;
    esac
done
case "$SEED" in
    '' | *[!0-9]*) echo "tmdht-error bad seed '$SEED'"; exit 1 ;;
esac

# seeded_text SEED LINES: deterministic pseudo-random text records (about 30 bytes a line).
seeded_text() {
    awk -v seed="$1" -v n="$2" 'BEGIN {
        srand(seed)
        words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima"
        split(words, w, " ")
        for (i = 0; i < n; i++)
            printf "%08x %07d %s-%s\n", int(rand() * 4294967296), i, w[1 + int(rand() * 12)], \
                w[1 + int(rand() * 12)]
    }'
}

# fill_file OCTAL BYTES FILE: a file of one repeated byte (fill-pattern pages).
fill_file() {
    head -c "$2" /dev/zero | tr '\000' "\\$1" > "$3"
}

workload_idle() {
    :
}

workload_files() {
    d=/tmp/files
    mkdir -p "$d"
    dd if=/dev/urandom of="$d/random.bin" bs=65536 count=$((16 + SEED % 16)) 2>/dev/null
    seeded_text "$SEED" 20000 > "$d/records.txt"
    gzip -c "$d/records.txt" > "$d/records.txt.gz"
    yes "tmdht pattern seed=$SEED" | head -c 1048576 > "$d/pattern.txt"
    fill_file "$(printf '%03o' $((SEED % 200 + 32)))" 524288 "$d/fill.bin"
    cp /bin/busybox "$d/busybox.copy"
    n=0
    while :; do
        echo "tick $n seed=$SEED" >> "$d/ticks.log"
        n=$((n + 1))
        sleep 2
    done
}

workload_compute() {
    d=/tmp/compute
    mkdir -p "$d"
    round=0
    while :; do
        seeded_text $((SEED * 1000 + round)) 4000 > "$d/input.txt"
        sort -k3 "$d/input.txt" > "$d/sorted.txt"
        sort -u -k1,1 "$d/input.txt" | md5sum > "$d/unique.md5"
        gzip -c "$d/sorted.txt" > "$d/sorted.txt.gz"
        gunzip -c "$d/sorted.txt.gz" | md5sum >> "$d/rounds.md5"
        round=$((round + 1))
    done
}

workload_mixed() {
    d=/tmp/mixed
    mkdir -p "$d"
    seeded_text $((SEED + 7)) 8000 > "$d/records.txt"
    dd if=/dev/urandom of="$d/random.bin" bs=65536 count=8 2>/dev/null
    cp /bin/busybox "$d/busybox.copy"
    fill_file "$(printf '%03o' $((SEED % 100 + 128)))" 262144 "$d/fill.bin"
    mkfifo "$d/hold"
    # A process holding a heap of seed-derived strings (anonymous memory, not page cache); it
    # blocks forever opening a FIFO nobody writes.
    awk -v seed="$SEED" -v hold="$d/hold" 'BEGIN {
        srand(seed)
        for (i = 0; i < 60000; i++) heap[i] = sprintf("%d:%08x", i, int(rand() * 4294967296))
        getline line < hold
    }' &
    round=0
    while :; do
        seeded_text $((SEED * 1000 + round)) 1000 | sort | md5sum >> "$d/rounds.md5"
        round=$((round + 1))
        sleep 1
    done
}

case "$WORKLOAD" in
    idle | files | compute | mixed) ;;
    *) echo "tmdht-error unknown workload '$WORKLOAD'"; exit 1 ;;
esac
workload_"$WORKLOAD" </dev/null >/tmp/workload.log 2>&1 &
echo "tmdht-ready workload=$WORKLOAD seed=$SEED" > /dev/ttyS0

i=0
while :; do
    echo "tmdht-counter $i" > /dev/ttyS0
    i=$((i + 1))
    sleep 1
done
