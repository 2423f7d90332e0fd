"""IPVS mode's kernel tools on their own, inside user-mode Linux: `ipvsadm -R`, `ipset
restore` and `ip -batch` for S Services x E real servers, then for one more Service.

This is the IPVS column of the seed's table measured with the stock tools, and the
baseline Sluice's IPVS mode is compared with when it runs. Each tool runs as its own
process; `process start` (ipvsadm -R of an empty input) is reported so the kernel's share
can be told from the cost of starting a process in the guest.
"""

import os
import subprocess
import tempfile

from . import fixtures as fx
from . import netns
from .modes import timed

ADD_REPS = 3


def _write(d, name, text):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def run(ctx, scales):
    if os.environ.get("UML_RUN") != "1" and not os.path.exists("/proc/net/ip_vs"):
        # On the host (no IPVS in this kernel) there is nothing to measure.
        pass
    for (s, e) in scales:
        rec = ctx.results.recorder({"mode": "ipvs", "S": s, "E": e, "mix": "clusterip"})
        try:
            one_scale(ctx, s, e, rec)
        except Exception as ex:         # keep the other scales
            ctx.results.failures.append(({"mode": "ipvs-kernel", "S": s}, str(ex)))
            ctx.log(f"ipvs kernel baseline S={s}: {ex}")


def one_scale(ctx, s, e, rec):
    ns = netns.Namespace("v")
    d = tempfile.mkdtemp(dir=ctx.tmp)
    try:
        ns.run(["ip", "link", "add", "kube-ipvs0", "type", "dummy"])
        ipvs, sets, addrs = [], ["create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 1048576"], []
        for i in range(s):
            vip = fx.cluster_ip(i)
            ipvs.append(f"-A -t {vip}:80 -s rr")
            base = i * e
            for j in range(e):
                ep = f"10.{128 + ((base + j) >> 16)}.{((base + j) >> 8) & 255}.{(base + j) & 255}"
                ipvs.append(f"-a -t {vip}:80 -r {ep}:8080 -m -w 1")
            sets.append(f"add KUBE-CLUSTER-IP {vip},tcp:80")
            addrs.append(f"addr add {vip}/32 dev kube-ipvs0")
        p_ipvs = _write(d, "ipvs.txt", "\n".join(ipvs) + "\n")
        p_sets = _write(d, "sets.txt", "\n".join(sets) + "\n")
        p_addrs = _write(d, "addrs.txt", "\n".join(addrs) + "\n")
        p_empty = _write(d, "empty.txt", "")
        rec("ipvs-kernel", "cold_ipvsadm_s", timed(["ipvsadm", "-R"], p_ipvs, ns))
        rec("ipvs-kernel", "cold_ipset_s", timed(["ipset", "restore"], p_sets, ns))
        rec("ipvs-kernel", "cold_ipaddr_s", timed(["ip", "-batch", "-"], p_addrs, ns))
        vip, ep = fx.ADDED_CLUSTER_IP, fx.ADDED_BACKEND
        add_ipvs = _write(d, "add-ipvs.txt", f"-A -u {vip}:53 -s rr\n-a -u {vip}:53 -r {ep}:5353 -m -w 1\n")
        del_ipvs = _write(d, "del-ipvs.txt", f"-D -u {vip}:53\n")
        add_set = _write(d, "add-set.txt", f"add KUBE-CLUSTER-IP {vip},udp:53\n")
        del_set = _write(d, "del-set.txt", f"del KUBE-CLUSTER-IP {vip},udp:53\n")
        add_addr = _write(d, "add-addr.txt", f"addr add {vip}/32 dev kube-ipvs0\n")
        del_addr = _write(d, "del-addr.txt", f"addr del {vip}/32 dev kube-ipvs0\n")
        add100 = "".join(f"-A -u 10.111.1.{k}:53 -s rr\n-a -u 10.111.1.{k}:53 -r {ep}:5353 -m -w 1\n" for k in range(1, 101))
        add100_ipvs = _write(d, "add100-ipvs.txt", add100)
        del100_ipvs = _write(d, "del100-ipvs.txt", "".join(f"-D -u 10.111.1.{k}:53\n" for k in range(1, 101)))
        for r in range(ADD_REPS):
            exec_s = timed(["ipvsadm", "-R"], p_empty, ns)
            rec("ipvs-kernel", "exec_s", exec_s, rep=r)
            rec("ipvs-kernel", "add100_ipvsadm_per_s", max(0.0, timed(["ipvsadm", "-R"], add100_ipvs, ns) - exec_s) / 100, rep=r)
            timed(["ipvsadm", "-R"], del100_ipvs, ns)
            rec("ipvs-kernel", "add_ipvsadm_s", timed(["ipvsadm", "-R"], add_ipvs, ns), rep=r)
            rec("ipvs-kernel", "add_ipset_s", timed(["ipset", "restore"], add_set, ns), rep=r)
            rec("ipvs-kernel", "add_ipaddr_s", timed(["ip", "-batch", "-"], add_addr, ns), rep=r)
            timed(["ipvsadm", "-R"], del_ipvs, ns)
            timed(["ipset", "restore"], del_set, ns)
            timed(["ip", "-batch", "-"], del_addr, ns)
        with netns.entered(ns):
            out = subprocess.run(["ipvsadm", "-Ln"], stdout=subprocess.PIPE, text=True).stdout
        rec("ipvs-kernel", "entries", sum(1 for l in out.splitlines() if l.startswith(("TCP", "UDP", "  ->")) and "Remote" not in l))
        ctx.log(f"ipvs kernel baseline S={s}: done")
    finally:
        ns.delete()
        subprocess.run(["rm", "-rf", d])
