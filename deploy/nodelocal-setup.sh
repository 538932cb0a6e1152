#!/bin/sh
# Prepare a node for the node-local cache: give it a link-local listening address and keep
# DNS traffic to and from that address out of conntrack.
#
# Why: glibc sends A and AAAA from one socket at once; when both go through DNAT to a
# Service IP, conntrack can drop one of them and the pod waits 5 s (DESIGN.md failure 2).
# Queries to a local address that is NOTRACKed never enter conntrack, so they never race.
#
# Runs as the DaemonSet's init container (hostNetwork, NET_ADMIN), or by hand. Idempotent:
# running it again adds nothing twice. `teardown` as the first argument removes it all.
#
# Environment:
#   LOCAL_DNS_IP    the address pods query (default 169.254.20.10, NodeLocal DNSCache's)
#   INTERFACE       the interface that holds it (default nodelocaldns)
#   DNS_PORT        the port (default 53)
set -eu

LOCAL_DNS_IP=${LOCAL_DNS_IP:-169.254.20.10}
INTERFACE=${INTERFACE:-nodelocaldns}
DNS_PORT=${DNS_PORT:-53}

# Each rule as "TABLE CHAIN MATCH...": NOTRACK both directions in raw, and accept the
# untracked packets in filter in case the node's policy drops INVALID/untracked ones.
rules() {
    for proto in udp tcp; do
        echo "raw PREROUTING -d $LOCAL_DNS_IP/32 -p $proto --dport $DNS_PORT -j NOTRACK"
        echo "raw OUTPUT -s $LOCAL_DNS_IP/32 -p $proto --sport $DNS_PORT -j NOTRACK"
        echo "filter INPUT -d $LOCAL_DNS_IP/32 -p $proto --dport $DNS_PORT -j ACCEPT"
        echo "filter OUTPUT -s $LOCAL_DNS_IP/32 -p $proto --sport $DNS_PORT -j ACCEPT"
    done
}

add_address() {
    # A dummy interface keeps the address off every real link; where the kernel lacks the
    # dummy driver (some sandboxes), the loopback interface holds it just as well.
    if ! ip link show "$INTERFACE" >/dev/null 2>&1; then
        if ip link add "$INTERFACE" type dummy 2>/dev/null; then
            ip link set "$INTERFACE" up
        else
            echo "nodelocal-setup: no dummy interface support; using lo for $LOCAL_DNS_IP" >&2
            INTERFACE=lo
            ip link set lo up
        fi
    fi
    if ! ip -o addr show dev "$INTERFACE" | grep -q " $LOCAL_DNS_IP/"; then
        ip addr add "$LOCAL_DNS_IP/32" dev "$INTERFACE"
    fi
}

remove_address() {
    if ip link show "$INTERFACE" >/dev/null 2>&1; then
        ip link del "$INTERFACE"
    elif ip -o addr show dev lo | grep -q " $LOCAL_DNS_IP/"; then
        ip addr del "$LOCAL_DNS_IP/32" dev lo
    fi
}

setup() {
    add_address
    rules | while read -r table chain match; do
        # shellcheck disable=SC2086  # the match is a list of words on purpose
        iptables -w -t "$table" -C "$chain" $match 2>/dev/null || iptables -w -t "$table" -I "$chain" 1 $match
    done
    echo "nodelocal-setup: $LOCAL_DNS_IP on $INTERFACE, port $DNS_PORT untracked"
}

teardown() {
    rules | while read -r table chain match; do
        # shellcheck disable=SC2086
        while iptables -w -t "$table" -D "$chain" $match 2>/dev/null; do :; done
    done
    remove_address
    echo "nodelocal-setup: removed $LOCAL_DNS_IP and its rules"
}

case "${1:-setup}" in
    setup) setup ;;
    teardown) teardown ;;
    *) echo "usage: $0 [setup|teardown]" >&2; exit 2 ;;
esac
