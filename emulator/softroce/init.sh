#!/bin/sh
# PID 1 of the SoftRoCE guest (busybox, from the initramfs): load the RDMA modules, mount the
# host's root filesystem read-only over 9p, give it writable /run, /dev/shm and /run/out (the
# harness's share), then run guest.sh chrooted into it, so the guest uses the host's programs.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
echo "[guest] init at uptime $(cut -d' ' -f1 /proc/uptime)s"
echo /sbin/modprobe > /proc/sys/kernel/modprobe
for m in $(cat /etc/fusee-modules); do
    modprobe "$m" || echo "[guest] modprobe $m failed"
done
O=trans=virtio,version=9p2000.L,msize=512000
if mount -t 9p -o "$O,ro,cache=loose" hostroot /host; then
    mount -t proc proc /host/proc
    mount -t sysfs sysfs /host/sys
    mount -t devtmpfs dev /host/dev
    mkdir -p /host/dev/pts /host/dev/shm
    mount -t devpts devpts /host/dev/pts
    mount -t tmpfs -o mode=1777 shm /host/dev/shm
    mount -t tmpfs -o mode=755 run /host/run
    mkdir -p /host/run/out /host/run/tmp
    chmod 1777 /host/run/tmp
    mount -t 9p -o "$O" out /host/run/out && chroot /host /bin/sh /run/out/guest.sh
else
    echo "[guest] cannot mount the host root over 9p"
fi
sync
poweroff -f
