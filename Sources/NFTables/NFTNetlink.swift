// Sluice: a per-node Kubernetes service proxy.
// Partial syncs as nf_tables netlink messages (linux/netfilter/nf_tables.h), sent as one
// nfnetlink batch through the Netlink module, without libnftables. libnftables reads the whole
// table from the kernel before every command (with ~10 000 anonymous verdict maps at 10 000
// Services that read alone takes seconds); a batch built here costs what it changes.
//
// The messages are the ones `nft` 1.0.x sends for the same commands (checked against
// `nft --debug=netlink` and `--debug=mnl`), so `nft list table` prints the same text: the
// same expressions, registers, set flags and the user data nft reads back (comments, key
// byte order, the typeof of anonymous sets).

import Netlink
import SluiceCore

/// One command of a transaction, as a value (what ``NFTNetlinkEncoder`` turns into messages).
public enum NFTOperation: Sendable, Hashable {
    /// `add chain` of a regular chain.
    case addChain(String)
    /// `flush chain`.
    case flushChain(String)
    /// `delete chain`.
    case deleteChain(String)
    /// `add rule`.
    case addRule(chain: String, NFTRule)
    /// `add set` (affinity sets: an address type, `dynamic,timeout`, a timeout).
    case addSet(NFTContainer)
    /// `delete set`.
    case deleteSet(String)
    /// `add element`.
    case addElement(NFTElement)
    /// `delete element`.
    case deleteElement(NFTElementKey)
}

/// A failed netlink transaction: the kernel's errno, its extended-ack text, and the message
/// it failed on (`NFT_MSG_NEWRULE ip kube-proxy service-…: …`). The kernel applied nothing.
public struct NFTNetlinkError: Error, Sendable, CustomStringConvertible {
    /// The kernel's error number.
    public var errno: Errno
    /// The kernel's extended-ack text, if any.
    public var message: String?
    /// The failing message and its object.
    public var operation: String
    /// Every other message the kernel rejected in the same batch.
    public var otherFailures: Int

    /// Creates an error.
    public init(errno: Errno, message: String? = nil, operation: String, otherFailures: Int = 0) {
        self.errno = errno
        self.message = message
        self.operation = operation
        self.otherFailures = otherFailures
    }

    public var description: String {
        var out = "\(operation): \(errno)"
        if let message, !message.isEmpty { out += ": \(message)" }
        if otherFailures > 0 { out += " (and \(otherFailures) more failed messages in the batch)" }
        return out
    }
}

/// A command the encoder cannot express (an element key or verdict it does not know).
public struct NFTEncodingError: Error, Sendable, CustomStringConvertible {
    /// What was wrong.
    public var description: String
    init(_ description: String) { self.description = description }
}

/// nf_tables numbers (linux/netfilter/nf_tables.h, linux/netfilter/nfnetlink.h).
enum NFTK {
    static let subsystem: UInt16 = 10
    // enum nf_tables_msg_types
    static let newChain: UInt16 = 3, delChain: UInt16 = 5, newRule: UInt16 = 6, delRule: UInt16 = 8
    static let newSet: UInt16 = 9, delSet: UInt16 = 11, newSetElem: UInt16 = 12, delSetElem: UInt16 = 14
    // NFTA_CHAIN_*
    static let chainTable: UInt16 = 1, chainName: UInt16 = 3
    // NFTA_RULE_*
    static let ruleTable: UInt16 = 1, ruleChain: UInt16 = 2, ruleExpressions: UInt16 = 4, ruleUserdata: UInt16 = 7
    // NFTA_LIST_ELEM, NFTA_EXPR_*
    static let listElem: UInt16 = 1, exprName: UInt16 = 1, exprData: UInt16 = 2
    // NFTA_SET_*
    static let setTable: UInt16 = 1, setName: UInt16 = 2, setFlags: UInt16 = 3, setKeyType: UInt16 = 4, setKeyLen: UInt16 = 5
    static let setDataType: UInt16 = 6, setDataLen: UInt16 = 7, setDesc: UInt16 = 9, setID: UInt16 = 10, setTimeout: UInt16 = 11
    static let setUserdata: UInt16 = 13, setDescSize: UInt16 = 1
    // enum nft_set_flags
    static let setAnonymous: UInt32 = 0x1, setConstant: UInt32 = 0x2, setInterval: UInt32 = 0x4, setMap: UInt32 = 0x8
    static let setTimeoutFlag: UInt32 = 0x10, setEval: UInt32 = 0x20
    // NFTA_SET_ELEM_LIST_*, NFTA_SET_ELEM_*
    static let elemListTable: UInt16 = 1, elemListSet: UInt16 = 2, elemListElements: UInt16 = 3, elemListSetID: UInt16 = 4
    static let elemKey: UInt16 = 1, elemData: UInt16 = 2, elemFlags: UInt16 = 3, elemUserdata: UInt16 = 6
    static let elemIntervalEnd: UInt32 = 0x1
    // NFTA_DATA_*, NFTA_VERDICT_*
    static let dataValue: UInt16 = 1, dataVerdict: UInt16 = 2, verdictCode: UInt16 = 1, verdictChain: UInt16 = 2
    static let verdictDataType: UInt32 = 0xffff_ff00
    // verdict codes
    static let nfDrop: UInt32 = 0, nfAccept: UInt32 = 1, nftJump: UInt32 = 0xffff_fffd, nftGoto: UInt32 = 0xffff_fffc
    // registers
    static let regVerdict: UInt32 = 0, reg1: UInt32 = 1, reg2: UInt32 = 2
    // nft's datatypes (set key types)
    static let typeInteger: UInt32 = 4, typeIPv4: UInt32 = 7, typeIPv6: UInt32 = 8
}

/// Builds the nf_tables messages of a transaction for one table.
public struct NFTNetlinkEncoder: Sendable {
    /// The table family.
    public let family: NFTFamily
    /// The table name.
    public let table: String
    private var nextSetID: UInt32 = 0

    /// Creates an encoder for `table` in `family`.
    public init(family: NFTFamily, table: String = kubeProxyTableName) {
        self.family = family
        self.table = table
    }

    private var addressLength: Int { family == .ip ? 4 : 16 }
    private var addressType: UInt32 { family == .ip ? NFTK.typeIPv4 : NFTK.typeIPv6 }

    private func request(_ message: UInt16, flags: NetlinkMessageFlags, _ attrs: [NetlinkAttribute], _ operation: String) -> NetlinkRequest {
        // struct nfgenmsg: family, NFNETLINK_V0, res_id 0.
        var payload: [UInt8] = [family.nfproto, 0, 0, 0]
        for a in attrs { a.encode(into: &payload) }
        return NetlinkRequest(type: NFTK.subsystem << 8 | message, flags: flags, payload: payload,
                              operation: operation)
    }

    private var tableSpec: String { "\(family.rawValue) \(table)" }

    /// The messages of `operations`, in order (without the batch framing).
    public mutating func encode(_ operations: [NFTOperation]) throws(NFTEncodingError) -> [NetlinkRequest] {
        var out: [NetlinkRequest] = []
        out.reserveCapacity(operations.count)
        for op in operations { try encode(op, into: &out) }
        return out
    }

    /// Appends the messages of one operation.
    public mutating func encode(_ op: NFTOperation, into out: inout [NetlinkRequest]) throws(NFTEncodingError) {
        let tableAttr = NetlinkAttribute.string(1, table)
        switch op {
        case .addChain(let name):
            out.append(request(NFTK.newChain, flags: [.request, .create], [tableAttr, .string(NFTK.chainName, name)],
                               "NFT_MSG_NEWCHAIN \(tableSpec) \(name)"))
        case .flushChain(let name):
            out.append(request(NFTK.delRule, flags: [.request], [tableAttr, .string(NFTK.ruleChain, name)],
                               "NFT_MSG_DELRULE (flush chain) \(tableSpec) \(name)"))
        case .deleteChain(let name):
            out.append(request(NFTK.delChain, flags: [.request], [tableAttr, .string(NFTK.chainName, name)],
                               "NFT_MSG_DELCHAIN \(tableSpec) \(name)"))
        case .addRule(let chain, let rule):
            var exprs: [NetlinkAttribute] = []
            try expressions(rule, into: &exprs, sets: &out)
            var attrs = [tableAttr, .string(NFTK.ruleChain, chain), .nested(NFTK.ruleExpressions, exprs)]
            if let c = rule.comment { attrs.append(.bytes(NFTK.ruleUserdata, Self.commentUserdata(c))) }
            out.append(request(NFTK.newRule, flags: [.request, .create, .append], attrs,
                               "NFT_MSG_NEWRULE \(tableSpec) \(chain) \(rule.text(family))"))
        case .addSet(let s):
            guard s.kind == .set, s.type == family.addressType else {
                throw NFTEncodingError("set \(s.name) of type \(s.type): only \(family.addressType) sets are encoded")
            }
            var flags: UInt32 = 0
            for f in s.flags {
                switch f {
                case "dynamic": flags |= NFTK.setEval
                case "timeout": flags |= NFTK.setTimeoutFlag
                default: throw NFTEncodingError("set \(s.name): flag \(f) is not encoded")
                }
            }
            guard s.comment == nil else { throw NFTEncodingError("set \(s.name): comments are not encoded") }
            nextSetID += 1
            var attrs: [NetlinkAttribute] = [
                tableAttr, .string(NFTK.setName, s.name), .be32(NFTK.setFlags, flags), .be32(NFTK.setKeyType, addressType),
                .be32(NFTK.setKeyLen, UInt32(addressLength)), .be32(NFTK.setID, nextSetID),
            ]
            if let t = s.timeoutSeconds {
                var p: [UInt8] = []
                p.appendBigEndian(UInt64(t) * 1000)
                attrs.append(.bytes(NFTK.setTimeout, p))
            }
            // NFTNL_UDATA_SET_KEYBYTEORDER: big endian (addresses).
            attrs.append(.bytes(NFTK.setUserdata, [0, 4, 2, 0, 0, 0]))
            out.append(request(NFTK.newSet, flags: [.request, .create], attrs, "NFT_MSG_NEWSET \(tableSpec) \(s.name)"))
        case .deleteSet(let name):
            out.append(request(NFTK.delSet, flags: [.request], [tableAttr, .string(NFTK.setName, name)],
                               "NFT_MSG_DELSET \(tableSpec) \(name)"))
        case .addElement(let e):
            var elem: [NetlinkAttribute] = [.nested(NFTK.elemKey, [.bytes(NFTK.dataValue, try elementKey(e.id))])]
            if let v = e.value {
                guard let verdict = NFTVerdict(text: v) else { throw NFTEncodingError("element \(e.body) of \(e.id.container): verdict \(v)") }
                elem.append(.nested(NFTK.elemData, [Self.verdictAttribute(verdict)]))
            }
            if let c = e.comment { elem.append(.bytes(NFTK.elemUserdata, Self.commentUserdata(c))) }
            out.append(request(NFTK.newSetElem, flags: [.request, .create],
                               [tableAttr, .string(NFTK.elemListSet, e.id.container),
                                .nested(NFTK.elemListElements, [.nested(NFTK.listElem, elem)])],
                               "NFT_MSG_NEWSETELEM \(tableSpec) \(e.id.container) { \(e.body) }"))
        case .deleteElement(let id):
            let elem: [NetlinkAttribute] = [.nested(NFTK.elemKey, [.bytes(NFTK.dataValue, try elementKey(id))])]
            out.append(request(NFTK.delSetElem, flags: [.request],
                               [tableAttr, .string(NFTK.elemListSet, id.container),
                                .nested(NFTK.elemListElements, [.nested(NFTK.listElem, elem)])],
                               "NFT_MSG_DELSETELEM \(tableSpec) \(id.container) { \(id.key) }"))
        }
    }

    // MARK: user data (libnftnl's TLVs: type, length, value)

    /// `NFTNL_UDATA_RULE_COMMENT` / `NFTNL_UDATA_SET_ELEM_COMMENT` (both 0): the text with its NUL.
    static func commentUserdata(_ comment: String) -> [UInt8] {
        let bytes = Array(comment.utf8.prefix(254)) + [0]
        return [0, UInt8(bytes.count)] + bytes
    }

    static func verdictAttribute(_ v: NFTVerdict) -> NetlinkAttribute {
        switch v {
        case .drop: return .nested(NFTK.dataVerdict, [.be32(NFTK.verdictCode, NFTK.nfDrop)])
        case .accept: return .nested(NFTK.dataVerdict, [.be32(NFTK.verdictCode, NFTK.nfAccept)])
        case .jump(let c): return .nested(NFTK.dataVerdict, [.be32(NFTK.verdictCode, NFTK.nftJump), .string(NFTK.verdictChain, c)])
        case .goto(let c): return .nested(NFTK.dataVerdict, [.be32(NFTK.verdictCode, NFTK.nftGoto), .string(NFTK.verdictChain, c)])
        }
    }

    // MARK: element keys

    /// The key bytes of an element: its ` . `-separated components (address, `tcp`/`udp`/`sctp`,
    /// port), each padded to 4 bytes as nft concatenates them.
    func elementKey(_ id: NFTElementKey) throws(NFTEncodingError) -> [UInt8] {
        var out: [UInt8] = []
        let parts = id.key.split(separator: " . ", omittingEmptySubsequences: false)
        for part in parts {
            let text = String(part)
            if let ip = IPAddress(text) {
                guard ip.family == family.ipFamily else { throw NFTEncodingError("element \(id.key) of \(id.container): address family") }
                out += ip.bytes
            } else if let proto = Self.protocolNumber(text) {
                out += [proto, 0, 0, 0]
            } else if let port = UInt16(text) {
                out.appendBigEndian(port)
                out += [0, 0]
            } else {
                throw NFTEncodingError("element \(id.key) of \(id.container): cannot encode \(text)")
            }
        }
        return out
    }

    static func protocolNumber(_ name: String) -> UInt8? {
        switch name {
        case "tcp": return 6
        case "udp": return 17
        case "sctp": return 132
        default: return nil
        }
    }

    // MARK: expressions

    private static func expr(_ name: String, _ data: [NetlinkAttribute]) -> NetlinkAttribute {
        .nested(NFTK.listElem, [.string(NFTK.exprName, name), .nested(NFTK.exprData, data)])
    }

    /// `[ payload load LEN @ network header + OFFSET => reg 1 ]`.
    private static func payload(offset: UInt32, length: Int) -> NetlinkAttribute {
        expr("payload", [.be32(1, NFTK.reg1), .be32(2, 1), .be32(3, offset), .be32(4, UInt32(length))])
    }

    /// `[ cmp eq|neq reg 1 DATA ]`.
    private static func cmp(negated: Bool, _ data: [UInt8]) -> NetlinkAttribute {
        expr("cmp", [.be32(1, NFTK.reg1), .be32(2, negated ? 1 : 0), .nested(3, [.bytes(NFTK.dataValue, data)])])
    }

    private static func immediate(_ v: NFTVerdict) -> NetlinkAttribute {
        expr("immediate", [.be32(1, NFTK.regVerdict), .nested(2, [verdictAttribute(v)])])
    }

    private static func immediate(register: UInt32, _ data: [UInt8]) -> NetlinkAttribute {
        expr("immediate", [.be32(1, register), .nested(2, [.bytes(NFTK.dataValue, data)])])
    }

    private func addressOffset(_ f: NFTAddressField) -> UInt32 {
        switch (family, f) {
        case (.ip, .source): return 12
        case (.ip, .destination): return 16
        case (.ip6, .source): return 8
        case (.ip6, .destination): return 24
        }
    }

    /// A prefix compare as nft writes it: the whole address; only the prefix's bytes when it
    /// ends on a byte; else the whole address through a mask.
    private func addressCompare(_ f: NFTAddressField, negated: Bool, _ block: CIDR, into out: inout [NetlinkAttribute]) {
        let bits = addressLength * 8
        let bytes = block.address.bytes
        if block.prefixLength == bits {
            out.append(Self.payload(offset: addressOffset(f), length: addressLength))
            out.append(Self.cmp(negated: negated, bytes))
        } else if block.prefixLength > 0 && block.prefixLength % 8 == 0 {
            let n = block.prefixLength / 8
            out.append(Self.payload(offset: addressOffset(f), length: n))
            out.append(Self.cmp(negated: negated, Array(bytes.prefix(n))))
        } else {
            out.append(Self.payload(offset: addressOffset(f), length: addressLength))
            var mask = [UInt8](repeating: 0, count: addressLength)
            for i in 0..<block.prefixLength { mask[i / 8] |= 0x80 >> UInt8(i % 8) }
            out.append(Self.expr("bitwise", [
                .be32(1, NFTK.reg1), .be32(2, NFTK.reg1), .be32(3, UInt32(addressLength)),
                .nested(4, [.bytes(NFTK.dataValue, mask)]),
                .nested(5, [.bytes(NFTK.dataValue, [UInt8](repeating: 0, count: addressLength))]),
            ]))
            out.append(Self.cmp(negated: negated, bytes))
        }
    }

    /// The rule's expressions; anonymous sets it needs are appended to `sets` (they precede
    /// the rule in the batch).
    private mutating func expressions(_ rule: NFTRule, into out: inout [NetlinkAttribute],
                                      sets: inout [NetlinkRequest]) throws(NFTEncodingError) {
        for m in rule.matches {
            switch m {
            case .address(let f, let negated, let op):
                guard op.block.family == family.ipFamily else { throw NFTEncodingError("address \(op) in an \(family.rawValue) table") }
                addressCompare(f, negated: negated, op.block, into: &out)
            case .addressInSet(let f, let set):
                out.append(Self.payload(offset: addressOffset(f), length: addressLength))
                out.append(Self.expr("lookup", [.be32(2, NFTK.reg1), .string(1, set)]))
            case .addressNotInList(let f, let ops):
                for op in ops where op.block.family != family.ipFamily {
                    throw NFTEncodingError("address \(op) in an \(family.rawValue) table")
                }
                if ops.count == 1 {
                    addressCompare(f, negated: true, ops[0].block, into: &out)
                } else {
                    let id = anonymousIntervalSet(ops.map(\.block), into: &sets)
                    out.append(Self.payload(offset: addressOffset(f), length: addressLength))
                    out.append(Self.expr("lookup", [.be32(2, NFTK.reg1), .string(1, "__set%d"), .be32(4, id), .be32(5, 1)]))
                }
            case .fibSourceLocal:
                // [ fib saddr type => reg 1 ] [ cmp eq reg 1 RTN_LOCAL ]
                out.append(Self.expr("fib", [.be32(3, 1), .be32(2, 3), .be32(1, NFTK.reg1)]))
                var local: [UInt8] = []
                local.appendHost(UInt32(2))
                out.append(Self.cmp(negated: false, local))
            case .l4proto(let p):
                guard let n = Self.protocolNumber(p) else { throw NFTEncodingError("protocol \(p)") }
                out.append(Self.expr("meta", [.be32(2, 16), .be32(1, NFTK.reg1)]))
                out.append(Self.cmp(negated: false, [n]))
            }
        }
        switch rule.statement {
        case .verdict(let v):
            out.append(Self.immediate(v))
        case .numgenVmap(let chains):
            let id = anonymousVerdictMap(chains, into: &sets)
            out.append(Self.expr("numgen", [.be32(1, NFTK.reg1), .be32(2, UInt32(chains.count)), .be32(3, 1), .be32(4, 0)]))
            out.append(Self.expr("lookup", [.be32(2, NFTK.reg1), .be32(3, NFTK.regVerdict), .string(1, "__map%d"), .be32(4, id)]))
        case .dnat(let ip, let port):
            guard ip.family == family.ipFamily else { throw NFTEncodingError("dnat to \(ip) in an \(family.rawValue) table") }
            out.append(Self.immediate(register: NFTK.reg1, ip.bytes))
            var p: [UInt8] = []
            p.appendBigEndian(UInt16(truncatingIfNeeded: port))
            out.append(Self.immediate(register: NFTK.reg2, p))
            // NFT_NAT_DNAT, family, addr min reg 1, proto min reg 2, NF_NAT_RANGE_PROTO_SPECIFIED.
            out.append(Self.expr("nat", [.be32(1, 1), .be32(2, UInt32(family.nfproto)), .be32(3, NFTK.reg1), .be32(5, NFTK.reg2), .be32(7, 2)]))
        case .updateSet(let set, let f):
            out.append(Self.payload(offset: addressOffset(f), length: addressLength))
            // NFTA_DYNSET_SREG_KEY, NFTA_DYNSET_OP (NFT_DYNSET_OP_UPDATE), NFTA_DYNSET_SET_NAME.
            out.append(Self.expr("dynset", [.be32(4, NFTK.reg1), .be32(3, 1), .string(1, set)]))
        }
    }

    /// `numgen … vmap { 0 : goto A , … }`'s anonymous map: NEWSET then NEWSETELEM; returns its
    /// NFTA_SET_ID.
    private mutating func anonymousVerdictMap(_ chains: [String], into out: inout [NetlinkRequest]) -> UInt32 {
        nextSetID += 1
        let id = nextSetID
        let tableAttr = NetlinkAttribute.string(1, table)
        // nft's user data: key byte order host, data byte order 0, data typeof verdict, no data interval.
        let udata: [UInt8] = [0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0, 4, 8, 0, 4, 1, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0]
        out.append(request(NFTK.newSet, flags: [.request, .create], [
            tableAttr, .string(NFTK.setName, "__map%d"),
            .be32(NFTK.setFlags, NFTK.setAnonymous | NFTK.setConstant | NFTK.setMap),
            .be32(NFTK.setKeyType, NFTK.typeInteger), .be32(NFTK.setKeyLen, 4),
            .be32(NFTK.setDataType, NFTK.verdictDataType), .be32(NFTK.setDataLen, 0),
            .be32(NFTK.setID, id), .nested(NFTK.setDesc, [.be32(NFTK.setDescSize, UInt32(chains.count))]),
            .bytes(NFTK.setUserdata, udata),
        ], "NFT_MSG_NEWSET \(tableSpec) __map%d (numgen vmap of \(chains.count))"))
        var elems: [NetlinkAttribute] = []
        elems.reserveCapacity(chains.count)
        for (n, c) in chains.enumerated() {
            var key: [UInt8] = []
            key.appendHost(UInt32(n))
            // libnftnl numbers the elements of a list (the kernel ignores the type).
            elems.append(.nested(UInt16(n + 1), [.nested(NFTK.elemKey, [.bytes(NFTK.dataValue, key)]),
                                                 .nested(NFTK.elemData, [Self.verdictAttribute(.goto(c))])]))
        }
        out.append(request(NFTK.newSetElem, flags: [.request, .create], [
            tableAttr, .string(NFTK.elemListSet, "__map%d"), .be32(NFTK.elemListSetID, id), .nested(NFTK.elemListElements, elems),
        ], "NFT_MSG_NEWSETELEM \(tableSpec) __map%d"))
        return id
    }

    /// `ip saddr != { A , B }`'s anonymous interval set: the blocks merged (nft merges
    /// overlapping and adjacent ranges of anonymous sets), written as range starts and
    /// interval ends from address 0 up.
    private mutating func anonymousIntervalSet(_ blocks: [CIDR], into out: inout [NetlinkRequest]) -> UInt32 {
        nextSetID += 1
        let id = nextSetID
        let tableAttr = NetlinkAttribute.string(1, table)
        // Ranges [start, end] as big integers (bytes), sorted and merged.
        var ranges = blocks.map { b -> (start: [UInt8], end: [UInt8]) in
            var end = b.address.bytes
            for i in b.prefixLength..<(addressLength * 8) { end[i / 8] |= 0x80 >> UInt8(i % 8) }
            return (b.address.bytes, end)
        }
        ranges.sort { $0.start.lexicographicallyPrecedes($1.start) }
        var merged: [(start: [UInt8], end: [UInt8])] = []
        for r in ranges {
            if let last = merged.last {
                // Overlapping or adjacent (nothing lies between): one range.
                guard let next = Self.increment(last.end) else { continue }
                if !next.lexicographicallyPrecedes(r.start) {
                    if last.end.lexicographicallyPrecedes(r.end) { merged[merged.count - 1].end = r.end }
                    continue
                }
            }
            merged.append(r)
        }
        let zero = [UInt8](repeating: 0, count: addressLength)
        var elems: [NetlinkAttribute] = []
        var size = 0
        func element(_ key: [UInt8], end: Bool, open: Bool = false) {
            var e: [NetlinkAttribute] = []
            if end { e.append(.be32(NFTK.elemFlags, NFTK.elemIntervalEnd)) }
            e.append(.nested(NFTK.elemKey, [.bytes(NFTK.dataValue, key)]))
            // NFTNL_UDATA_SET_ELEM_FLAGS: NFTNL_SET_ELEM_F_INTERVAL_OPEN (a range up to the top).
            if open { e.append(.bytes(NFTK.elemUserdata, [1, 4, 1, 0, 0, 0])) }
            elems.append(.nested(UInt16(elems.count + 1), e))
        }
        if let first = merged.first, first.start != zero {
            element(zero, end: true)
            size += 1
        }
        for r in merged {
            if let next = Self.increment(r.end) {
                element(r.start, end: false)
                element(next, end: true)
            } else {
                element(r.start, end: false, open: true)
            }
            size += 2
        }
        // User data: key byte order big endian, merge elements, key typeof `ip saddr`/`ip6 saddr`.
        let typeof: [UInt8] = family == .ip
            ? [3, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 11, 0, 0, 0]
            : [3, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 8, 0, 0, 0]
        let udata: [UInt8] = [0, 4, 2, 0, 0, 0, 2, 4, 1, 0, 0, 0] + typeof
        out.append(request(NFTK.newSet, flags: [.request, .create], [
            tableAttr, .string(NFTK.setName, "__set%d"),
            .be32(NFTK.setFlags, NFTK.setAnonymous | NFTK.setConstant | NFTK.setInterval),
            .be32(NFTK.setKeyType, addressType), .be32(NFTK.setKeyLen, UInt32(addressLength)),
            .be32(NFTK.setID, id), .nested(NFTK.setDesc, [.be32(NFTK.setDescSize, UInt32(size))]),
            .bytes(NFTK.setUserdata, udata),
        ], "NFT_MSG_NEWSET \(tableSpec) __set%d (\(blocks.count) source ranges)"))
        out.append(request(NFTK.newSetElem, flags: [.request, .create], [
            tableAttr, .string(NFTK.elemListSet, "__set%d"), .be32(NFTK.elemListSetID, id), .nested(NFTK.elemListElements, elems),
        ], "NFT_MSG_NEWSETELEM \(tableSpec) __set%d"))
        return id
    }

    /// `bytes` + 1 as a big-endian integer; nil on overflow.
    private static func increment(_ bytes: [UInt8]) -> [UInt8]? {
        var out = bytes
        for i in stride(from: out.count - 1, through: 0, by: -1) {
            if out[i] == 0xff {
                out[i] = 0
            } else {
                out[i] += 1
                return out
            }
        }
        return nil
    }
}

/// Sends transactions to one table as nf_tables netlink batches.
public actor NFTNetlinkWriter {
    private let connection: NetlinkConnection
    /// The table family.
    public nonisolated let family: NFTFamily
    /// The table name.
    public nonisolated let table: String

    /// Opens a `NETLINK_NETFILTER` socket in the current network namespace.
    public init(family: NFTFamily, table: String = kubeProxyTableName) throws {
        connection = try NetlinkConnection(protocol: NetlinkProtocol.netfilter)
        self.family = family
        self.table = table
    }

    /// Applies `operations` as one batch: all or nothing.
    /// - Throws: ``NFTEncodingError`` before anything is sent, ``NFTNetlinkError`` when the
    ///   kernel rejects a message (then it applied none of them), `NetlinkError` when the
    ///   socket fails.
    public func apply(_ operations: [NFTOperation]) async throws {
        guard !operations.isEmpty else { return }
        var encoder = NFTNetlinkEncoder(family: family, table: table)
        let requests = NFNetlinkBatch.wrap(try encoder.encode(operations), subsystem: NFTK.subsystem)
        let errors = try await connection.executeInOneDatagram(requests)
        if let first = errors.first {
            throw NFTNetlinkError(errno: first.error.errno, message: first.error.message, operation: first.error.operation,
                                  otherFailures: errors.count - 1)
        }
    }
}
