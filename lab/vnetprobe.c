/*
 * vnetprobe: the network probe of tmdht's network lab guests (built static into their initramfs).
 *
 *   vnetprobe udp-echo PORT
 *       Echo every datagram back to its sender. The first 8 bytes of a datagram are a big-endian
 *       sequence number; the probe counts what it received per run (a run starts when a sender
 *       uses a new source address): received, highest sequence, reordered (lower than the highest
 *       seen), duplicates (seen before). A datagram whose sequence is 2**64-1 is not echoed: it
 *       is answered with one text line of those counters ("report ...").
 *   vnetprobe tcp-sink PORT
 *       Accept connections one at a time; read until end of stream, then write one line
 *       "bytes=N usec=T" (from the first byte to the end) and close.
 *   vnetprobe tcp-send HOST PORT SECONDS
 *       Send as much as possible for SECONDS, then print the sink's answer as
 *       "tmdht-tcp bytes=N usec=T mbit=R".
 *
 * Only the C library; errors go to stderr with a non-zero exit status.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REPORT_SEQ UINT64_MAX
#define SEEN_BITS (1u << 24) /* sequence numbers tracked for duplicates (2 MiB bitmap) */

static uint64_t now_usec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

#define BATCH 64

static int udp_echo(int port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    int size = 16 << 20;
    /* Root in the guest: go past rmem_max, so a burst of held frames is not dropped here. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("vnetprobe udp-echo");
        return 1;
    }
    unsigned char *seen = calloc(SEEN_BITS / 8, 1);
    static unsigned char bufs[BATCH][2048];
    struct mmsghdr msgs[BATCH];
    struct iovec iovs[BATCH];
    struct sockaddr_in peers[BATCH], run_peer = {0};
    uint64_t received = 0, highest = 0, reordered = 0, duplicates = 0;
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iovs[i].iov_base = bufs[i];
            iovs[i].iov_len = sizeof bufs[i];
            msgs[i].msg_hdr = (struct msghdr){.msg_name = &peers[i], .msg_namelen = sizeof peers[i],
                                              .msg_iov = &iovs[i], .msg_iovlen = 1};
        }
        int got = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (got < 0) {
            if (errno == EINTR) continue;
            perror("vnetprobe recvmmsg");
            return 1;
        }
        int echo = 0;
        for (int i = 0; i < got; i++) {
            unsigned int n = msgs[i].msg_len;
            struct sockaddr_in *peer = &peers[i];
            if (n < 8) continue;
            uint64_t seq = be64(bufs[i]);
            if (seq == REPORT_SEQ) {
                char line[256];
                int m = snprintf(line, sizeof line,
                                 "report received=%llu highest=%llu reordered=%llu duplicates=%llu\n",
                                 (unsigned long long)received, (unsigned long long)highest,
                                 (unsigned long long)reordered, (unsigned long long)duplicates);
                sendto(fd, line, m, 0, (struct sockaddr *)peer, sizeof *peer);
                continue;
            }
            if (peer->sin_addr.s_addr != run_peer.sin_addr.s_addr || peer->sin_port != run_peer.sin_port) {
                run_peer = *peer; /* a new sender: a new run */
                memset(seen, 0, SEEN_BITS / 8);
                received = highest = reordered = duplicates = 0;
            }
            received++;
            if (seq < SEEN_BITS) {
                if (seen[seq / 8] & (1u << (seq % 8))) duplicates++;
                seen[seq / 8] |= (unsigned char)(1u << (seq % 8));
            }
            if (seq < highest) reordered++;
            if (seq > highest) highest = seq;
            iovs[i].iov_len = n;
            if (echo != i) {
                msgs[echo] = msgs[i];
            }
            echo++;
        }
        for (int sent = 0; sent < echo;) {
            int n = sendmmsg(fd, msgs + sent, echo - sent, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                break; /* the echo is best effort: the counts above are what matter */
            }
            sent += n;
        }
    }
}

static int tcp_sink(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 4) < 0) {
        perror("vnetprobe tcp-sink");
        return 1;
    }
    static unsigned char buf[1 << 16];
    for (;;) {
        int conn = accept(fd, NULL, NULL);
        if (conn < 0) continue;
        uint64_t bytes = 0, first = 0, last = 0;
        for (;;) {
            ssize_t n = read(conn, buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            if (!bytes) first = now_usec();
            bytes += (uint64_t)n;
            last = now_usec();
        }
        char line[128];
        int m = snprintf(line, sizeof line, "bytes=%llu usec=%llu\n", (unsigned long long)bytes,
                         (unsigned long long)(last - first));
        if (write(conn, line, m) < 0) perror("vnetprobe tcp-sink write");
        close(conn);
    }
}

static int tcp_send(const char *host, int port, double seconds) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0 || inet_pton(AF_INET, host, &addr.sin_addr) != 1 ||
        connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("vnetprobe tcp-send connect");
        return 1;
    }
    static unsigned char buf[1 << 16];
    memset(buf, 0x5a, sizeof buf);
    uint64_t end = now_usec() + (uint64_t)(seconds * 1e6);
    while (now_usec() < end) {
        ssize_t n = write(fd, buf, sizeof buf);
        if (n < 0 && errno != EINTR) {
            perror("vnetprobe tcp-send write");
            return 1;
        }
    }
    shutdown(fd, SHUT_WR);
    char answer[128] = {0};
    ssize_t got = 0, n;
    while (got < (ssize_t)sizeof answer - 1 &&
           (n = read(fd, answer + got, sizeof answer - 1 - got)) > 0)
        got += n;
    unsigned long long bytes = 0, usec = 0;
    if (sscanf(answer, "bytes=%llu usec=%llu", &bytes, &usec) != 2 || usec == 0) {
        fprintf(stderr, "vnetprobe tcp-send: bad answer '%s'\n", answer);
        return 1;
    }
    printf("tmdht-tcp bytes=%llu usec=%llu mbit=%.1f\n", bytes, usec, bytes * 8.0 / usec);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "udp-echo")) return udp_echo(atoi(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "tcp-sink")) return tcp_sink(atoi(argv[2]));
    if (argc == 5 && !strcmp(argv[1], "tcp-send")) return tcp_send(argv[2], atoi(argv[3]), atof(argv[4]));
    fprintf(stderr, "usage: vnetprobe udp-echo PORT | tcp-sink PORT | tcp-send HOST PORT SECONDS\n");
    return 2;
}
