"""iptables-restore payloads: counting them, and deriving the minimal one.

The "minimal" payload of a change is what an ideal incremental writer would send for it:
only the changed Service's own chains (declared, refilled, or deleted) and, for an added or
deleted Service, one `-I`/`-D` of its KUBE-SERVICES rule, with `--noflush`. This is the
"nft 1 svc" figure. Sluice's partial sync writes the changed Services' chains
and touches a top-level chain (KUBE-SERVICES and the rest) only where its rules changed: a
payload that leaves KUBE-SERVICES out left it as it was; one that adds or deletes a Service edits
it with `-I KUBE-SERVICES <position>` / `-D KUBE-SERVICES <rule>` lines; only a larger change
declares it (`:KUBE-SERVICES`) and writes it whole.
"""

SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")


def tables(text):
    """{table: [lines]} of a restore payload (without the *table and COMMIT lines)."""
    out = {}
    cur = None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = line[1:]
            out[cur] = []
        elif line == "COMMIT":
            cur = None
        elif cur is not None and line and not line.startswith("#"):
            out[cur].append(line)
    return out


def counts(text):
    """(rules appended, chains declared, chains deleted) over all tables."""
    a = c = x = 0
    for lines in tables(text).values():
        for line in lines:
            if line.startswith("-A "):
                a += 1
            elif line.startswith(":"):
                c += 1
            elif line.startswith("-X "):
                x += 1
    return a, c, x


def _chain_of(line):
    if line.startswith(":"):
        return line[1:].split(" ", 1)[0]
    parts = line.split(" ", 2)
    return parts[1] if len(parts) > 1 else ""


def _mentions(line, port_prefix):
    return f'"{port_prefix}' in line or f" {port_prefix}" in line


def declares(text, table, chain):
    """Whether a restore payload declares (and so rewrites) `chain` of `table`."""
    return any(l.startswith(f":{chain} ") for l in tables(text).get(table, []))


def _insert_spec(line):
    """The rule of an `-A CHAIN rule` or `-I CHAIN [N] rule` line."""
    words = line.split(" ", 3)
    if words[0] == "-I" and len(words) > 3 and words[2].isdigit():
        return words[3]
    return line.split(" ", 2)[2]


def minimal(new_text, prev_text, service):
    """The minimal payload for the change that turned `prev_text`'s state into `new_text`'s,
    for Service `service` ("namespace/name"). Both are Sluice payloads; when `new_text`
    rewrites KUBE-SERVICES whole, `prev_text` must hold the complete KUBE-SERVICES chain as it
    was before the change (a full payload, or the last one that rewrote KUBE-SERVICES). When
    `new_text` edits KUBE-SERVICES (`-I`/`-D`), the edits of the Service's rules are the
    change; when it leaves KUBE-SERVICES out, the change left it as it was: the minimal payload
    does not touch it either."""
    new = tables(new_text).get("nat", [])
    prev = tables(prev_text).get("nat", [])
    prefix = service + ":"
    rewrites = declares(new_text, "nat", "KUBE-SERVICES")
    if rewrites and not declares(prev_text, "nat", "KUBE-SERVICES"):
        raise ValueError("minimal: the previous payload does not hold KUBE-SERVICES")
    decls, rules, deletes = [], [], []
    for line in new:
        chain = _chain_of(line)
        if not chain.startswith(SERVICE_CHAIN_PREFIXES):
            continue
        if line.startswith(":"):
            decls.append(line)
        elif line.startswith("-X "):
            deletes.append(line)
        else:
            rules.append(line)
    if rewrites:
        top_prev = [l for l in prev if l.startswith("-A KUBE-SERVICES ") and _mentions(l, prefix)]
        top_new = [l for l in new if l.startswith("-A KUBE-SERVICES ") and _mentions(l, prefix)]
        removed = ["-D" + l[2:] for l in top_prev if l not in top_new]
        added = ["-I KUBE-SERVICES 1" + l[len("-A KUBE-SERVICES"):] for l in top_new if l not in top_prev]
    else:
        edits = [l for l in new if l.startswith(("-I KUBE-SERVICES ", "-D KUBE-SERVICES ", "-A KUBE-SERVICES "))
                 and _mentions(l, prefix)]
        removed = [l for l in edits if l.startswith("-D ")]
        added = ["-I KUBE-SERVICES 1 " + _insert_spec(l) for l in edits if not l.startswith("-D ")]
    out = ["*nat"] + decls + removed + added + rules + deletes + ["COMMIT"]
    return "\n".join(out) + "\n"
