# Runs chrooted into the host's root inside the guest (Debian /bin/sh): creates the SoftRoCE
# device on a dummy interface (no NIC: nothing leaves the VM), waits for its port to be ACTIVE,
# then runs the harness's command in the caller's directory and environment, and records the
# command's exit status in /run/out/rc for the harness.
. /run/out/env.sh
if [ -n "${FUSEE_GUEST_SHARE:-}" ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share "$FUSEE_GUEST_SHARE" ||
        echo "[guest] cannot mount the share at $FUSEE_GUEST_SHARE"
fi
ip link set lo up
ip link add "$FUSEE_GUEST_NETDEV" type dummy
ip addr add "$FUSEE_GUEST_ADDR" dev "$FUSEE_GUEST_NETDEV"
ip link set "$FUSEE_GUEST_NETDEV" up
rdma link add "$FUSEE_GUEST_RDMA_DEV" type rxe netdev "$FUSEE_GUEST_NETDEV" ||
    echo "[guest] rdma link add $FUSEE_GUEST_RDMA_DEV failed"
i=0
until rdma link show "$FUSEE_GUEST_RDMA_DEV/1" 2>/dev/null | grep -q 'state ACTIVE'; do
    i=$((i + 1))
    if [ "$i" -gt 100 ]; then echo "[guest] $FUSEE_GUEST_RDMA_DEV port not ACTIVE"; break; fi
    sleep 0.1
done
rdma link show
echo "[guest] ready at uptime $(cut -d' ' -f1 /proc/uptime)s; running: $(cat /run/out/cmd.sh)"
/bin/sh /run/out/cmd.sh < /dev/null
echo $? > /run/out/rc
echo "[guest] command exited $(cat /run/out/rc) at uptime $(cut -d' ' -f1 /proc/uptime)s"
