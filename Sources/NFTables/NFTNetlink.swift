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
    /// `add table` with a comment.
    case addTable(comment: String?)
    /// `add chain` of a regular chain.
    case addChain(String)
    /// `add chain NAME { type T hook H priority P ; comment "…" ; }`.
    case declareChain(String, hook: NFTHook?, comment: String?)
    /// `flush set` / `flush map`.
    case flushSet(String)
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
    static let newTable: UInt16 = 0, newChain: UInt16 = 3, delChain: UInt16 = 5, newRule: UInt16 = 6, delRule: UInt16 = 8
    static let newSet: UInt16 = 9, delSet: UInt16 = 11, newSetElem: UInt16 = 12, delSetElem: UInt16 = 14
    // NFTA_CHAIN_*
    static let chainTable: UInt16 = 1, chainName: UInt16 = 3, chainHook: UInt16 = 4, chainType: UInt16 = 7, chainUserdata: UInt16 = 12
    static let hookNumber: UInt16 = 1, hookPriority: UInt16 = 2
    // NFTA_TABLE_*
    static let tableName: UInt16 = 1, tableFlags: UInt16 = 2, tableUserdata: UInt16 = 6
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
    static let nftReturn: UInt32 = 0xffff_fffb
    // registers
    static let regVerdict: UInt32 = 0, reg1: UInt32 = 1, reg2: UInt32 = 2
    // nft's datatypes (set key types)
    static let typeInteger: UInt32 = 4, typeIPv4: UInt32 = 7, typeIPv6: UInt32 = 8
    static let typeInetProto: UInt32 = 12, typeInetService: UInt32 = 13
    // concatenated types: each component's type shifted in (nft's TYPE_BITS, 6)
    static func concat(_ types: [UInt32]) -> UInt32 { types.reduce(0) { $0 << 6 | $1 } }
}

/// Builds the nf_tables messages of a transaction for one table.
public struct NFTNetlinkEncoder: Sendable {
    /// The table family.
    public let family: NFTFamily
    /// The table name.
    public let table: String
    /// The token in the names of the anonymous sets this encoder creates (see
    /// ``anonymousSetName(_:)``).
    public let anonymousSetToken: String
    private var nextSetID: UInt32 = 0
    private var anonymousSets: UInt64 = 0

    /// Creates an encoder for `table` in `family`.
    /// - Parameter anonymousSetToken: what makes this encoder's anonymous set names its own;
    ///   a random one unless a test needs fixed bytes. Letters, digits and `_` only.
    public init(family: NFTFamily, table: String = kubeProxyTableName, anonymousSetToken: String = NFTNetlinkEncoder.randomToken()) {
        self.family = family
        self.table = table
        self.anonymousSetToken = anonymousSetToken
    }

    /// 12 random hexadecimal digits (48 bits).
    public static func randomToken() -> String {
        let n = UInt64.random(in: 0..<(1 << 48))
        let hex = String(n, radix: 16)
        return String(repeating: "0", count: 12 - hex.count) + hex
    }

    /// The next name for an anonymous set: `__map_TOKEN_N` or `__set_TOKEN_N`.
    ///
    /// nft names anonymous sets `__map%d` / `__set%d` and lets the kernel pick the number:
    /// `nf_tables_set_alloc_name()` then parses the name of every set of the table for each
    /// new one, so at 10 000 Services (10 000 anonymous verdict maps) one new set costs
    /// milliseconds and a full load grows with the square of the table. A name without `%` is
    /// taken as it is (the kernel only checks that no set of the table has it). The `_` after
    /// `__map`/`__set` keeps these names apart from nft's (`__map0`, …, written by nft or
    /// kube-proxy), the random token from those of an earlier Sluice process whose sets are
    /// still bound to rules, and the counter from this encoder's earlier ones. The sets keep
    /// `NFT_SET_ANONYMOUS`: bound to their rule, deleted with it, and listed inline by
    /// `nft list table`. Names are at most 39 bytes (the kernel allows 255).
    public mutating func anonymousSetName(_ kind: AnonymousSetKind) -> String {
        anonymousSets += 1
        return "__\(kind.rawValue)_\(anonymousSetToken)_\(anonymousSets)"
    }

    /// The two kinds of anonymous sets the encoder creates.
    public enum AnonymousSetKind: String, Sendable {
        /// A verdict map (`numgen … vmap { … }`).
        case map
        /// An interval set of addresses (`ip saddr != { … }`).
        case set
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
        case .addTable(let comment):
            var attrs: [NetlinkAttribute] = [.string(NFTK.tableName, table), .be32(NFTK.tableFlags, 0)]
            if let comment { attrs.append(.bytes(NFTK.tableUserdata, Self.commentUserdata(comment))) }
            out.append(request(NFTK.newTable, flags: [.request, .create], attrs, "NFT_MSG_NEWTABLE \(tableSpec)"))
        case .declareChain(let name, let hook, let comment):
            var attrs: [NetlinkAttribute] = [tableAttr, .string(NFTK.chainName, name)]
            if let hook {
                guard let number = Self.hookNumber(hook.hook) else { throw NFTEncodingError("chain \(name): hook \(hook.hook)") }
                attrs.append(.string(NFTK.chainType, hook.type))
                attrs.append(.nested(NFTK.chainHook, [.be32(NFTK.hookNumber, number),
                                                      .be32(NFTK.hookPriority, UInt32(bitPattern: Int32(hook.priority)))]))
            }
            if let comment { attrs.append(.bytes(NFTK.chainUserdata, Self.commentUserdata(comment))) }
            out.append(request(NFTK.newChain, flags: [.request, .create], attrs, "NFT_MSG_NEWCHAIN \(tableSpec) \(name)"))
        case .flushSet(let name):
            out.append(request(NFTK.delSetElem, flags: [.request], [tableAttr, .string(NFTK.elemListSet, name)],
                               "NFT_MSG_DELSETELEM (flush set) \(tableSpec) \(name)"))
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
            let map = try mapKey(s)
            guard map != nil || (s.kind == .set && s.type == family.addressType) else {
                throw NFTEncodingError("set \(s.name) of type \(s.type): only \(family.addressType) sets and verdict maps are encoded")
            }
            var flags: UInt32 = map != nil ? NFTK.setMap : 0
            for f in s.flags {
                switch f {
                case "dynamic": flags |= NFTK.setEval
                case "timeout": flags |= NFTK.setTimeoutFlag
                default: throw NFTEncodingError("set \(s.name): flag \(f) is not encoded")
                }
            }
            nextSetID &+= 1
            var attrs: [NetlinkAttribute] = [tableAttr, .string(NFTK.setName, s.name), .be32(NFTK.setFlags, flags)]
            var udata: [UInt8]
            if let map {
                attrs += [.be32(NFTK.setKeyType, map.type), .be32(NFTK.setKeyLen, map.length),
                          .be32(NFTK.setDataType, NFTK.verdictDataType), .be32(NFTK.setDataLen, 0)]
                // nft's user data of a concatenation : verdict map (byte orders, key typeof, no data interval).
                udata = [0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0]
            } else {
                attrs += [.be32(NFTK.setKeyType, addressType), .be32(NFTK.setKeyLen, UInt32(addressLength))]
                // NFTNL_UDATA_SET_KEYBYTEORDER: big endian (addresses).
                udata = [0, 4, 2, 0, 0, 0]
            }
            attrs.append(.be32(NFTK.setID, nextSetID))
            if let t = s.timeoutSeconds {
                var p: [UInt8] = []
                p.appendBigEndian(UInt64(t) * 1000)
                attrs.append(.bytes(NFTK.setTimeout, p))
            }
            // NFTNL_UDATA_SET_COMMENT (7).
            if let c = s.comment { udata += [7] + Self.commentUserdata(c).dropFirst() }
            attrs.append(.bytes(NFTK.setUserdata, udata))
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

    /// The key type and length of a verdict map kube-proxy declares
    /// (`ADDR . inet_proto . inet_service : verdict`, `inet_proto . inet_service : verdict`);
    /// nil for a set.
    private func mapKey(_ c: NFTContainer) throws(NFTEncodingError) -> (type: UInt32, length: UInt32)? {
        guard c.kind == .map else { return nil }
        guard c.flags.isEmpty, c.timeoutSeconds == nil else { throw NFTEncodingError("map \(c.name): flags or timeout are not encoded") }
        switch c.type {
        case "\(family.addressType) . inet_proto . inet_service : verdict":
            return (NFTK.concat([addressType, NFTK.typeInetProto, NFTK.typeInetService]), UInt32(addressLength + 8))
        case "inet_proto . inet_service : verdict":
            return (NFTK.concat([NFTK.typeInetProto, NFTK.typeInetService]), 8)
        default:
            throw NFTEncodingError("map \(c.name) of type \(c.type) is not encoded")
        }
    }

    static func hookNumber(_ hook: String) -> UInt32? {
        switch hook {
        case "prerouting": return 0
        case "input": return 1
        case "forward": return 2
        case "output": return 3
        case "postrouting": return 4
        default: return nil
        }
    }

    /// A mark as configured (`0x4000`, `16384`).
    static func markValue(_ text: String) throws(NFTEncodingError) -> UInt32 {
        let v = text.lowercased().hasPrefix("0x") ? UInt32(text.dropFirst(2), radix: 16) : UInt32(text)
        guard let v else { throw NFTEncodingError("mark \(text)") }
        return v
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
        case .return: return .nested(NFTK.dataVerdict, [.be32(NFTK.verdictCode, NFTK.nftReturn)])
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

    /// `[ payload load LEN @ network header + OFFSET => reg 1 ]` (base 2: transport header).
    private static func payload(offset: UInt32, length: Int, base: UInt32 = 1, register: UInt32 = NFTK.reg1) -> NetlinkAttribute {
        expr("payload", [.be32(1, register), .be32(2, base), .be32(3, offset), .be32(4, UInt32(length))])
    }

    /// `[ meta load KEY => reg ]`.
    private static func metaLoad(_ key: UInt32, register: UInt32 = NFTK.reg1) -> NetlinkAttribute {
        expr("meta", [.be32(2, key), .be32(1, register)])
    }

    /// `[ bitwise reg 1 = ( reg 1 & MASK ) ^ XOR ]` on 4 host-order bytes; nft sends the
    /// operation (boolean) only for meta mark arithmetic.
    private static func bitwise(mask: UInt32, xor: UInt32, withOperation: Bool) -> NetlinkAttribute {
        var m: [UInt8] = [], x: [UInt8] = []
        m.appendHost(mask)
        x.appendHost(xor)
        var attrs: [NetlinkAttribute] = [.be32(1, NFTK.reg1), .be32(2, NFTK.reg1)]
        if withOperation { attrs.append(.be32(6, 0)) }
        attrs += [.be32(3, 4), .nested(4, [.bytes(NFTK.dataValue, m)]), .nested(5, [.bytes(NFTK.dataValue, x)])]
        return expr("bitwise", attrs)
    }

    private static func hostBytes(_ v: UInt32) -> [UInt8] {
        var out: [UInt8] = []
        out.appendHost(v)
        return out
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
                    let set = anonymousIntervalSet(ops.map(\.block), field: f, into: &sets)
                    out.append(Self.payload(offset: addressOffset(f), length: addressLength))
                    out.append(Self.expr("lookup", [.be32(2, NFTK.reg1), .string(1, set.name), .be32(4, set.id), .be32(5, 1)]))
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
            case .addressInList(let f, let ops):
                for op in ops where op.block.family != family.ipFamily {
                    throw NFTEncodingError("address \(op) in an \(family.rawValue) table")
                }
                if ops.count == 1 {
                    addressCompare(f, negated: false, ops[0].block, into: &out)
                } else {
                    let set = anonymousIntervalSet(ops.map(\.block), field: f, into: &sets)
                    out.append(Self.payload(offset: addressOffset(f), length: addressLength))
                    out.append(Self.expr("lookup", [.be32(2, NFTK.reg1), .string(1, set.name), .be32(4, set.id)]))
                }
            case .fibDestinationLocal:
                // [ fib daddr type => reg 1 ] [ cmp eq reg 1 RTN_LOCAL ]
                out.append(Self.expr("fib", [.be32(3, 2), .be32(2, 3), .be32(1, NFTK.reg1)]))
                out.append(Self.cmp(negated: false, Self.hostBytes(2)))
            case .ctStateNew:
                // [ ct load state => reg 1 ] [ bitwise reg 1 = ( reg 1 & NEW ) ^ 0 ] [ cmp neq reg 1 0 ]
                out.append(Self.expr("ct", [.be32(2, 0), .be32(1, NFTK.reg1)]))
                out.append(Self.bitwise(mask: 8, xor: 0, withOperation: false))
                out.append(Self.cmp(negated: true, Self.hostBytes(0)))
            case .markClear(let text):
                let mark = try Self.markValue(text)
                out.append(Self.metaLoad(3))
                out.append(Self.bitwise(mask: mark, xor: 0, withOperation: true))
                out.append(Self.cmp(negated: false, Self.hostBytes(0)))
            }
        }
        switch rule.statement {
        case .verdict(let v):
            out.append(Self.immediate(v))
        case .numgenVmap(let chains):
            let map = anonymousVerdictMap(chains, into: &sets)
            out.append(Self.expr("numgen", [.be32(1, NFTK.reg1), .be32(2, UInt32(chains.count)), .be32(3, 1), .be32(4, 0)]))
            out.append(Self.expr("lookup", [.be32(2, NFTK.reg1), .be32(3, NFTK.regVerdict), .string(1, map.name), .be32(4, map.id)]))
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
        case .vmapLookup(let map, let withAddress):
            // The key's components in consecutive 32-bit registers from reg 1 (NFT_REG32_00 is
            // 8; nft names the 128-bit register 2 where an IPv6 address ends).
            let (protoReg, portReg): (UInt32, UInt32)
            if withAddress {
                out.append(Self.payload(offset: addressOffset(.destination), length: addressLength))
                (protoReg, portReg) = family == .ip ? (9, 10) : (2, 13)
            } else {
                (protoReg, portReg) = (NFTK.reg1, 9)
            }
            out.append(Self.metaLoad(16, register: protoReg))
            out.append(Self.payload(offset: 2, length: 2, base: 2, register: portReg))
            out.append(Self.expr("lookup", [.be32(2, NFTK.reg1), .be32(3, NFTK.regVerdict), .string(1, map)]))
        case .markSet(let op, let text):
            let mark = try Self.markValue(text)
            out.append(Self.metaLoad(3))
            out.append(op == .or ? Self.bitwise(mask: ~mark, xor: mark, withOperation: true)
                                 : Self.bitwise(mask: 0xffff_ffff, xor: mark, withOperation: true))
            out.append(Self.expr("meta", [.be32(2, 3), .be32(3, NFTK.reg1)]))
        case .masqueradeFullyRandom:
            // NFTA_MASQ_FLAGS: NF_NAT_RANGE_PROTO_RANDOM_FULLY.
            out.append(Self.expr("masq", [.be32(1, 0x10)]))
        case .reject:
            // NFT_REJECT_ICMP_UNREACH, port unreachable (ICMP code 3, ICMPv6 code 4).
            out.append(Self.expr("reject", [.be32(1, 0), .bytes(2, [family == .ip ? 3 : 4])]))
        }
    }

    /// `numgen … vmap { 0 : goto A , … }`'s anonymous map: NEWSET then NEWSETELEM; returns its
    /// NFTA_SET_ID.
    private mutating func anonymousVerdictMap(_ chains: [String], into out: inout [NetlinkRequest]) -> (id: UInt32, name: String) {
        nextSetID &+= 1
        let id = nextSetID
        let name = anonymousSetName(.map)
        let tableAttr = NetlinkAttribute.string(1, table)
        // nft's user data: key byte order host, data byte order 0, data typeof verdict, no data interval.
        let udata: [UInt8] = [0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0, 4, 8, 0, 4, 1, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0]
        out.append(request(NFTK.newSet, flags: [.request, .create], [
            tableAttr, .string(NFTK.setName, name),
            .be32(NFTK.setFlags, NFTK.setAnonymous | NFTK.setConstant | NFTK.setMap),
            .be32(NFTK.setKeyType, NFTK.typeInteger), .be32(NFTK.setKeyLen, 4),
            .be32(NFTK.setDataType, NFTK.verdictDataType), .be32(NFTK.setDataLen, 0),
            .be32(NFTK.setID, id), .nested(NFTK.setDesc, [.be32(NFTK.setDescSize, UInt32(chains.count))]),
            .bytes(NFTK.setUserdata, udata),
        ], "NFT_MSG_NEWSET \(tableSpec) \(name) (numgen vmap of \(chains.count))"))
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
            tableAttr, .string(NFTK.elemListSet, name), .be32(NFTK.elemListSetID, id), .nested(NFTK.elemListElements, elems),
        ], "NFT_MSG_NEWSETELEM \(tableSpec) \(name)"))
        return (id, name)
    }

    /// `ip saddr != { A , B }`'s anonymous interval set: the blocks merged (nft merges
    /// overlapping and adjacent ranges of anonymous sets), written as range starts and
    /// interval ends from address 0 up.
    private mutating func anonymousIntervalSet(_ blocks: [CIDR], field: NFTAddressField,
                                               into out: inout [NetlinkRequest]) -> (id: UInt32, name: String) {
        nextSetID &+= 1
        let id = nextSetID
        let name = anonymousSetName(.set)
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
        // User data: key byte order big endian, merge elements, key typeof `ip saddr`/`ip6 saddr`
        // (nft's protocol description and field numbers: ip 12, saddr 11, daddr 12; ip6 13, 8, 9).
        let fieldNumber: UInt8 = switch (family, field) {
        case (.ip, .source): 11
        case (.ip, .destination): 12
        case (.ip6, .source): 8
        case (.ip6, .destination): 9
        }
        let typeof: [UInt8] = family == .ip
            ? [3, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, fieldNumber, 0, 0, 0]
            : [3, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, fieldNumber, 0, 0, 0]
        let udata: [UInt8] = [0, 4, 2, 0, 0, 0, 2, 4, 1, 0, 0, 0] + typeof
        out.append(request(NFTK.newSet, flags: [.request, .create], [
            tableAttr, .string(NFTK.setName, name),
            .be32(NFTK.setFlags, NFTK.setAnonymous | NFTK.setConstant | NFTK.setInterval),
            .be32(NFTK.setKeyType, addressType), .be32(NFTK.setKeyLen, UInt32(addressLength)),
            .be32(NFTK.setID, id), .nested(NFTK.setDesc, [.be32(NFTK.setDescSize, UInt32(size))]),
            .bytes(NFTK.setUserdata, udata),
        ], "NFT_MSG_NEWSET \(tableSpec) \(name) (\(blocks.count) source ranges)"))
        out.append(request(NFTK.newSetElem, flags: [.request, .create], [
            tableAttr, .string(NFTK.elemListSet, name), .be32(NFTK.elemListSetID, id), .nested(NFTK.elemListElements, elems),
        ], "NFT_MSG_NEWSETELEM \(tableSpec) \(name)"))
        return (id, name)
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

/// A transaction encoded as one nfnetlink batch while it is built: each command becomes its
/// messages at once and only the bytes are kept (a full sync of 10 000 Services × 10
/// endpoints holds half a million commands; as values they would cost more memory than the
/// encoded batch).
public struct NFTNetlinkBatch: Sendable {
    private var encoder: NFTNetlinkEncoder
    /// The batch so far.
    public private(set) var buffer = NFNetlinkBatchBuffer(subsystem: NFTK.subsystem)
    private var scratch: [NetlinkRequest] = []

    /// Starts an empty batch for `table` in `family`; anonymous sets get this batch's own
    /// random token (``NFTNetlinkEncoder/anonymousSetName(_:)``).
    public init(family: NFTFamily, table: String = kubeProxyTableName) {
        encoder = NFTNetlinkEncoder(family: family, table: table)
    }

    /// Encodes and appends one command.
    public mutating func append(_ op: NFTOperation) throws(NFTEncodingError) {
        scratch.removeAll(keepingCapacity: true)
        try encoder.encode(op, into: &scratch)
        for r in scratch { buffer.append(r) }
    }

    /// Appends the batch's end (after the last command; in place, before the batch is shared).
    public mutating func end() { buffer.end() }

    /// The encoded size so far, in bytes.
    public var byteCount: Int { buffer.bytes.count }

    /// The number of nf_tables messages.
    public var messageCount: Int { buffer.count }
}

/// Sends transactions to one table as nf_tables netlink batches.
public actor NFTNetlinkWriter {
    private let connection: NetlinkConnection
    /// The table family.
    public nonisolated let family: NFTFamily
    /// The table name.
    public nonisolated let table: String
    /// One encoder for the writer's life: its anonymous set names (a random token of this
    /// writer and a counter) never repeat.
    private var encoder: NFTNetlinkEncoder

    /// Opens a `NETLINK_NETFILTER` socket in the current network namespace.
    public init(family: NFTFamily, table: String = kubeProxyTableName) throws {
        connection = try NetlinkConnection(protocol: NetlinkProtocol.netfilter)
        self.family = family
        self.table = table
        self.encoder = NFTNetlinkEncoder(family: family, table: table)
    }

    /// Applies `operations` as one batch: all or nothing.
    /// - Throws: ``NFTEncodingError`` before anything is sent, ``NFTNetlinkError`` when the
    ///   kernel rejects a message (then it applied none of them), `NetlinkError` when the
    ///   socket fails.
    public func apply(_ batch: consuming NFTNetlinkBatch) async throws {
        var buffer = batch.buffer
        if !buffer.ended { buffer.end() }
        guard let ack = buffer.ackSequence else { return }
        let errors = try await connection.executeEncodedBatch(buffer.bytes, ackSequence: ack,
                                                              operation: "\(buffer.count) nf_tables messages in one batch")
        guard let first = errors.first else { return }
        var what = "message \(first.sequence - 1) of \(buffer.count)"
        if let m = buffer.message(sequence: first.sequence) { what = Self.describe(m, family: family, table: table) }
        throw NFTNetlinkError(errno: first.error.errno, message: first.error.message, operation: what, otherFailures: errors.count - 1)
    }

    /// `NFT_MSG_NEWRULE ip kube-proxy CHAIN` and the like, from a message's bytes.
    static func describe(_ m: NetlinkMessage, family: NFTFamily, table: String) -> String {
        let names = [0: "NEWTABLE", 3: "NEWCHAIN", 5: "DELCHAIN", 6: "NEWRULE", 8: "DELRULE", 9: "NEWSET", 11: "DELSET",
                     12: "NEWSETELEM", 14: "DELSETELEM"]
        let type = Int(m.type & 0xff)
        var out = "NFT_MSG_\(names[type] ?? "\(type)") \(family.rawValue) \(table)"
        guard m.payload.count > 4, let attrs = try? NetlinkAttributes(parsing: Array(m.payload.dropFirst(4))) else { return out }
        // The chain of a chain or rule message, the set of a set or element message.
        let nameAttribute: UInt16 = type == 3 || type == 5 ? NFTK.chainName : 2
        if type != 0, let name = try? attrs.string(nameAttribute) { out += " " + name }
        return out
    }

    public func apply(_ operations: [NFTOperation]) async throws {
        guard !operations.isEmpty else { return }
        let requests = NFNetlinkBatch.wrap(try encoder.encode(operations), subsystem: NFTK.subsystem)
        let errors = try await connection.executeInOneDatagram(requests)
        if let first = errors.first {
            throw NFTNetlinkError(errno: first.error.errno, message: first.error.message, operation: first.error.operation,
                                  otherFailures: errors.count - 1)
        }
    }
}
