"""Tests of payload.minimal: `cd benchmarks && python3 -m unittest sluicebench.test_payload`.

The harness restores each change's minimal payload on the proxy's own rules (paused) in
pairs that must leave them as the proxy knows them: Sluice's partial syncs leave an
unchanged KUBE-SERVICES out and do not rewrite it later, so a minimal payload that deleted
a KUBE-SERVICES rule the change did not touch would break every later sync of that Service.
"""

import unittest

from sluicebench import payload

PROBE_UDP = '-A KUBE-SERVICES -m comment --comment "bench/svc-00000:dns cluster IP" -m udp -p udp -d 10.96.0.16 --dport 53 -j KUBE-SVC-UDP'
ADDED = '-A KUBE-SERVICES -m comment --comment "bench/svc-added:dns cluster IP" -m udp -p udp -d 10.111.0.10 --dport 53 -j KUBE-SVC-ADDED'
DISPATCH = '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS'


def _nat(*lines):
    return "*nat\n" + "".join(l + "\n" for l in lines) + "COMMIT\n"


def _services(*rules):
    return [":KUBE-SERVICES - [0:0]"] + list(rules)


def _probe_chains(gen):
    return [":KUBE-SVC-UDP - [0:0]", f":KUBE-SEP-G{gen} - [0:0]",
            f"-A KUBE-SVC-UDP -j KUBE-SEP-G{gen}",
            f"-A KUBE-SEP-G{gen} -m udp -p udp -j DNAT --to-destination 10.244.{16 + gen}.10:5353"]


def _change(gen):
    """A partial payload of the probe's endpoint change: KUBE-SERVICES unchanged, left out."""
    old = 1 - gen
    return _nat(*_probe_chains(gen), f":KUBE-SEP-G{old} - [0:0]", f"-X KUBE-SEP-G{old}")


class MinimalTest(unittest.TestCase):
    def test_endpoint_change_leaves_kube_services_alone(self):
        delete = _nat(*_services(PROBE_UDP, DISPATCH), ":KUBE-SVC-ADDED - [0:0]", "-X KUBE-SVC-ADDED")
        out = payload.minimal(_change(1), delete, "bench/svc-00000")
        self.assertNotIn("KUBE-SERVICES", out)
        self.assertIn("-X KUBE-SEP-G0", out)
        self.assertIn("DNAT --to-destination 10.244.17.10:5353", out)

    def test_added_and_deleted_service(self):
        full = _nat(*_services(PROBE_UDP, DISPATCH), *_probe_chains(0))
        add = _nat(*_services(PROBE_UDP, ADDED, DISPATCH), ":KUBE-SVC-ADDED - [0:0]")
        delete = _nat(*_services(PROBE_UDP, DISPATCH), ":KUBE-SVC-ADDED - [0:0]", "-X KUBE-SVC-ADDED")
        added = payload.minimal(add, full, "bench/svc-added")
        self.assertEqual([l for l in added.splitlines() if "KUBE-SERVICES" in l], ["-I KUBE-SERVICES 1" + ADDED[len("-A KUBE-SERVICES"):]])
        deleted = payload.minimal(delete, add, "bench/svc-added")
        self.assertEqual([l for l in deleted.splitlines() if "KUBE-SERVICES" in l], ["-D" + ADDED[2:]])

    def test_previous_payload_must_hold_kube_services(self):
        add = _nat(*_services(PROBE_UDP, ADDED, DISPATCH), ":KUBE-SVC-ADDED - [0:0]")
        with self.assertRaises(ValueError):
            payload.minimal(add, _change(1), "bench/svc-00000")
        # Without a rewrite of KUBE-SERVICES the previous payload is not needed.
        self.assertNotIn("KUBE-SERVICES", payload.minimal(_change(0), _change(1), "bench/svc-00000"))

    def test_edited_kube_services(self):
        """Sluice's own add and delete edit KUBE-SERVICES in place: the minimal payload takes the
        edits of the Service's rules (an insertion moved to position 1, as elsewhere)."""
        spec = ADDED[len("-A KUBE-SERVICES "):]
        add = _nat(":KUBE-SVC-ADDED - [0:0]", f"-I KUBE-SERVICES 2 {spec}", "-A KUBE-SVC-ADDED -j ACCEPT")
        delete = _nat(":KUBE-SVC-ADDED - [0:0]", f"-D KUBE-SERVICES {spec}", "-X KUBE-SVC-ADDED")
        full = _nat(*_services(PROBE_UDP, DISPATCH), *_probe_chains(0))
        added = payload.minimal(add, full, "bench/svc-added")
        self.assertEqual([l for l in added.splitlines() if "KUBE-SERVICES" in l], [f"-I KUBE-SERVICES 1 {spec}"])
        self.assertIn("-A KUBE-SVC-ADDED -j ACCEPT", added)
        deleted = payload.minimal(delete, add, "bench/svc-added")
        self.assertEqual([l for l in deleted.splitlines() if "KUBE-SERVICES" in l], [f"-D KUBE-SERVICES {spec}"])
        self.assertIn("-X KUBE-SVC-ADDED", deleted)

    def test_declares(self):
        self.assertTrue(payload.declares(_nat(*_services(PROBE_UDP)), "nat", "KUBE-SERVICES"))
        self.assertFalse(payload.declares(_change(1), "nat", "KUBE-SERVICES"))
        self.assertFalse(payload.declares(_nat(*_services(PROBE_UDP)), "filter", "KUBE-SERVICES"))


if __name__ == "__main__":
    unittest.main()
