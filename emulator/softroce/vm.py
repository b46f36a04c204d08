"""Run one command inside a qemu VM that has a SoftRoCE (``rdma_rxe``) device.

The verbs backend needs an RDMA device, and this machine's kernel (and CI's) has none. So the
harness boots Debian's stock kernel under qemu, loads ``rdma_rxe``, creates ``rxe0`` on a dummy
interface and runs the command there. The guest has no disk: a busybox initramfs mounts this
machine's root filesystem read-only over 9p and chroots into it, so the command sees the same
interpreter, packages and working tree as the caller (writable: /run, /run/tmp = TMPDIR,
/dev/shm, and a ``--share`` directory). The exit status is the command's; 125 means the VM
produced no result.

Everything is installed on demand: the Debian packages with apt (once), the kernel package
downloaded and unpacked (never installed) into a cache (~/.cache/fusee-softroce) together with
the initramfs, so a warm run costs only the boot. KVM is used when it works, else TCG.

    python -m fusee.emulator.softroce.vm -- python -m pytest -m rdma tests/test_rdma.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import lzma
import os
import queue
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: host packages: qemu and busybox for the VM, kmod/cpio to build the initramfs, and what the
#: guest uses from the host's root: iproute2's `rdma`, the rxe verbs provider, pyverbs
PACKAGES = ("qemu-system-x86", "busybox-static", "kmod", "cpio", "iproute2", "rdma-core",
            "ibverbs-providers", "libibverbs1", "python3-pyverbs")

#: guest kernel modules (their dependencies are added); crc32 is rxe's ICRC
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "dummy", "crc32_generic", "ib_core",
           "ib_uverbs", "rdma_ucm", "rdma_rxe")
APPLETS = ("sh", "mount", "mkdir", "chmod", "cat", "echo", "modprobe", "chroot", "cut", "sync",
           "poweroff")

#: environment passed into the guest, besides FUSEE_* (the rest is reset: a clean shell)
PASS_ENV = ("PATH", "HOME", "LANG", "PYTHONPATH", "PYENV_ROOT", "PYENV_VERSION", "VIRTUAL_ENV",
            "CI", "TERM")

NO_RESULT = 125
READY_MARK = "[guest] init at"


class HarnessError(RuntimeError):
    """The VM could not be prepared or did not run the command."""


def log(msg: str) -> None:
    print(f"[softroce] {msg}", flush=True)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("FUSEE_SOFTROCE_CACHE") or Path(base) / "fusee-softroce")


def _run(cmd, timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, timeout=timeout, **kw)
    except subprocess.CalledProcessError as e:
        raise HarnessError(f"{shlex.join(map(str, cmd))} failed with status {e.returncode}") \
            from None
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{shlex.join(map(str, cmd))} took over {timeout:g} s") from None


# -- host packages -------------------------------------------------------------------------------

def missing_packages() -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n", *PACKAGES],
                         capture_output=True, text=True).stdout
    have = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in PACKAGES if p not in have]


def apt_update() -> None:
    _run(["apt-get", "update", "-qq"], 600)


def ensure_packages() -> None:
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise HarnessError(f"missing Debian packages {' '.join(missing)}: install them as root")
    log(f"apt-get install {' '.join(missing)}")
    apt_update()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], 1800, env=env,
         stdout=subprocess.DEVNULL)


# -- guest kernel and initramfs (cached) -------------------------------------------------------

def _stamp() -> str:
    """Changes whenever what goes into the initramfs changes, so a stale cache is rebuilt."""
    h = hashlib.sha256((HERE / "init.sh").read_bytes())
    h.update(" ".join(MODULES + APPLETS).encode())
    return h.hexdigest()[:12]


def kernel_package() -> str:
    """The versioned package linux-image-amd64 points to (e.g. linux-image-6.1.0-42-amd64)."""
    for attempt in (0, 1):
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            dep = line.split(":", 1)[-1].strip()
            if line.strip().startswith("Depends:") and dep.startswith("linux-image-") and \
                    dep[len("linux-image-")].isdigit():
                return dep
        if attempt == 0:
            apt_update()        # a fresh machine has no package lists yet
    raise HarnessError("apt knows no linux-image-amd64 kernel package")


def guest_kernel() -> tuple[Path, Path]:
    """(vmlinux, initramfs) from the cache, built first if absent or stale."""
    root = cache_dir() / f"kernel-{_stamp()}"
    vmlinux, initrd = root / "vmlinux", root / "initramfs.cpio.gz"
    if vmlinux.is_file() and initrd.is_file():
        return vmlinux, initrd
    root.parent.mkdir(parents=True, exist_ok=True)
    for old in root.parent.glob("kernel-*"):        # an older harness's build
        shutil.rmtree(old, ignore_errors=True)
    pkg = kernel_package()
    log(f"building the guest kernel cache from {pkg} in {root}")
    with tempfile.TemporaryDirectory(dir=root.parent, prefix="build-") as scratch:
        tmp = Path(scratch)
        _run(["apt-get", "-o", "APT::Sandbox::User=root", "download", pkg], 900, cwd=tmp,
             stdout=subprocess.DEVNULL)
        (deb,) = tmp.glob(f"{pkg}_*.deb")
        kroot = tmp / "kroot"
        _run(["dpkg-deb", "-x", str(deb), str(kroot)], 300)
        deb.unlink()
        kv = pkg[len("linux-image-"):]
        _run(["depmod", "-b", str(kroot), kv], 300)
        out = tmp / "out"
        out.mkdir()
        _extract_vmlinux(kroot / "boot" / f"vmlinuz-{kv}", out / "vmlinux")
        _build_initramfs(kroot, kv, tmp / "initramfs", out / "initramfs.cpio.gz")
        (out / "kernel-version").write_text(kv + "\n")
        out.rename(root)
    return vmlinux, initrd


def _extract_vmlinux(bzimage: Path, dest: Path) -> None:
    """The uncompressed kernel: qemu boots it through its PVH entry point, which skips the
    decompressor (seconds under TCG)."""
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise HarnessError(f"{bzimage} is not an xz-compressed kernel")
    dest.write_bytes(lzma.LZMADecompressor().decompress(data[start:]))


def _build_initramfs(kroot: Path, kv: str, ir: Path, dest: Path) -> None:
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "host", f"lib/modules/{kv}"):
        (ir / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", ir / "bin" / "busybox")
    for a in APPLETS:
        link = ir / "bin" / a
        if not link.exists():
            link.symlink_to("busybox")
    (ir / "sbin" / "modprobe").symlink_to("../bin/busybox")
    shutil.copy2(HERE / "init.sh", ir / "init")
    (ir / "init").chmod(0o755)
    (ir / "etc" / "fusee-modules").write_text("\n".join(MODULES) + "\n")
    deps = subprocess.run(["modprobe", "-d", str(kroot), "-S", kv, "-a", "--show-depends",
                           *MODULES], capture_output=True, text=True, check=True).stdout
    for line in deps.splitlines():
        if line.startswith("insmod "):
            ko = Path(line.split()[1])
            rel = ko.relative_to(kroot)
            (ir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ko, ir / rel)
    mods = kroot / "lib" / "modules" / kv
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(mods / f, ir / "lib" / "modules" / kv / f)
    _run(["depmod", "-b", str(ir), kv], 120)
    names = subprocess.run(["find", "."], cwd=ir, capture_output=True, check=True).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=ir, input=names,
                             capture_output=True, check=True).stdout
    dest.write_bytes(gzip.compress(archive, compresslevel=1))


# -- one run -------------------------------------------------------------------------------------

def _guest_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("FUSEE_")})
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update(TMPDIR="/run/tmp", XDG_CACHE_HOME="/run/tmp/cache", MPLCONFIGDIR="/run/tmp/mpl",
               PYTHONDONTWRITEBYTECODE="1", FUSEE_RDMA_DEVICE="rxe0",
               FUSEE_GUEST_RDMA_DEV="rxe0", FUSEE_GUEST_NETDEV="fusee0",
               FUSEE_GUEST_ADDR="192.0.2.1/24")      # TEST-NET-1: exists only inside the VM
    env.update(extra)
    return env


def _kvm_memo() -> Path:
    """Where a failed KVM boot is remembered (per host kernel), so that later runs on a host
    whose /dev/kvm does not work (nested virtualization) do not wait for it again."""
    return cache_dir() / f"kvm-unusable-{os.uname().release}"


def _accelerators(accel: str) -> list[str]:
    if accel == "auto":
        kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK) and not _kvm_memo().exists()
        return ["kvm", "tcg"] if kvm_ok else ["tcg"]
    return [accel]


def run(command: list[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
        share: str | None = None, accel: str = "auto", mem: int = 3072, smp: int = 2,
        timeout: float = 3600, boot_timeout: float | None = None) -> int:
    """Run ``command`` in the guest; return its exit status (NO_RESULT if there is none).
    ``share``: a host directory the guest may write, at the same path (results come back)."""
    ensure_packages()
    vmlinux, initrd = guest_kernel()
    with tempfile.TemporaryDirectory(prefix="fusee-softroce-") as scratch:
        out = Path(scratch)
        shutil.copy2(HERE / "guest.sh", out / "guest.sh")
        genv = _guest_env(env or {})
        if share:
            share = str(Path(share).resolve())
            Path(share).mkdir(parents=True, exist_ok=True)
            genv["FUSEE_GUEST_SHARE"] = share
        (out / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n"
                                            for k, v in sorted(genv.items())))
        (out / "cmd.sh").write_text(f"cd {shlex.quote(cwd or os.getcwd())} && "
                                    f"{shlex.join(command)}\n")
        for acc in _accelerators(accel):
            rc = _boot(acc, vmlinux, initrd, out, share, mem, smp, timeout,
                       boot_timeout or (20 if acc == "kvm" else 120))
            if rc is not None:
                return rc
            if acc == "kvm":
                _kvm_memo().touch()
        return NO_RESULT


def _boot(acc: str, vmlinux: Path, initrd: Path, out: Path, share: str | None, mem: int,
          smp: int, timeout: float, boot_timeout: float) -> int | None:
    """One boot; the command's status, or None if the guest never reached its init."""
    (out / "rc").unlink(missing_ok=True)
    cpu = "host,-arch-capabilities" if acc == "kvm" else "max"   # plain "host" aborts on some KVMs
    cmd = ["qemu-system-x86_64", "-accel", acc, "-cpu", cpu, "-m", str(mem), "-smp", str(smp),
           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
           "-monitor", "none", "-no-reboot", "-nic", "none",
           "-kernel", str(vmlinux), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                      "multidevs=remap",
           "-virtfs", f"local,path={out},mount_tag=out,security_model=none"]
    if share:
        cmd += ["-virtfs", f"local,path={share},mount_tag=share,security_model=none"]
    log(f"booting ({acc}, {mem} MiB, {smp} vCPU)")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    booted = False
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:                                   # qemu exited
                break
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
                booted = booted or READY_MARK in line
            elapsed = time.monotonic() - t0
            if not booted and elapsed > boot_timeout:
                log(f"guest init not reached within {boot_timeout:g} s with {acc}")
                return None
            if elapsed > timeout:
                log(f"timeout: the VM ran over {timeout:g} s")
                return NO_RESULT
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    rc_file = out / "rc"
    log(f"qemu exited {proc.returncode} after {time.monotonic() - t0:.1f} s")
    if not booted:
        return None
    if not rc_file.exists():
        log("the guest produced no result")
        return NO_RESULT
    return int(rc_file.read_text().strip() or NO_RESULT)


def _pump(stream, lines: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").replace("\r", ""))
    lines.put(None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusee.emulator.softroce.vm",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--mem", type=int, default=3072, help="guest memory, MiB")
    p.add_argument("--smp", type=int, default=2, help="guest vCPUs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="set a variable in the guest (repeatable)")
    p.add_argument("--share", metavar="DIR",
                   help="host directory the guest can write, at the same path")
    p.add_argument("--prepare", action="store_true",
                   help="install packages and build the kernel cache, run nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- command and arguments")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        extra = dict(kv.split("=", 1) for kv in args.env)
    except ValueError:
        p.error("--env takes K=V")
    try:
        if args.prepare:
            ensure_packages()
            log(f"guest kernel ready: {guest_kernel()[0]}")
            return 0
        if not command:
            p.error("no command given")
        rc = run(command, env=extra, share=args.share, accel=args.accel, mem=args.mem,
                 smp=args.smp, timeout=args.timeout)
    except HarnessError as e:
        log(f"error: {e}")
        return NO_RESULT
    log(f"guest command exit status {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
