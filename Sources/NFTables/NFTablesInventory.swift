// Sluice: a per-node Kubernetes service proxy.
// Cheap reads of the nftables kernel state over nfnetlink (NFNL_SUBSYS_NFTABLES): whether
// the table exists, how many rules one chain holds (the canary), and the table's chain names
// (what a full sync compares with the chains it wants). libnftables would answer the same
// questions, but it fills its cache with the whole table first (0.3 s at 3 000 Services).

import Netlink
import SluiceCore

/// nf_tables message and attribute numbers (linux/netfilter/nf_tables.h).
enum NFTablesNetlinkConstant {
    /// `NFNL_SUBSYS_NFTABLES`.
    static let subsystem: UInt16 = 10
    /// `NFT_MSG_GETTABLE`.
    static let getTable: UInt16 = 1
    /// `NFT_MSG_GETCHAIN`.
    static let getChain: UInt16 = 4
    /// `NFT_MSG_GETRULE`.
    static let getRule: UInt16 = 7
    /// `NFT_MSG_GETSET`.
    static let getSet: UInt16 = 10
    /// `NFTA_SET_TABLE`.
    static let setTable: UInt16 = 1
    /// `NFTA_SET_NAME`.
    static let setName: UInt16 = 2
    /// `NFTA_TABLE_NAME`.
    static let tableName: UInt16 = 1
    /// `NFTA_CHAIN_TABLE`.
    static let chainTable: UInt16 = 1
    /// `NFTA_CHAIN_NAME`.
    static let chainName: UInt16 = 3
    /// `NFTA_RULE_TABLE`.
    static let ruleTable: UInt16 = 1
    /// `NFTA_RULE_CHAIN`.
    static let ruleChain: UInt16 = 2
}

extension NFTFamily {
    /// The `NFPROTO_*` number of the family (`NFPROTO_IPV4` 2, `NFPROTO_IPV6` 10).
    var nfproto: UInt8 { self == .ip ? 2 : 10 }
}


/// Reads table, chain and rule objects of one nftables table over nfnetlink.
public actor NFTablesInventory {
    private let connection: NetlinkConnection
    /// The table's family.
    public nonisolated let family: NFTFamily
    /// The table's name (`kube-proxy`).
    public nonisolated let table: String

    /// Opens a `NETLINK_NETFILTER` socket in the current network namespace.
    public init(table: String, family: NFTFamily) throws {
        connection = try NetlinkConnection(protocol: NetlinkProtocol.netfilter)
        self.family = family
        self.table = table
    }

    private func request(_ message: UInt16, _ attributes: [NetlinkAttribute], dump: Bool, operation: String) -> NetlinkRequest {
        // struct nfgenmsg: family, version NFNETLINK_V0, res_id 0.
        let payload: [UInt8] = [family.nfproto, 0, 0, 0] + attributes.encoded()
        return NetlinkRequest(type: NFTablesNetlinkConstant.subsystem << 8 | message,
                              flags: dump ? [.request, .dump] : [.request, .ack], payload: payload, operation: operation)
    }

    /// Whether the table exists (one `NFT_MSG_GETTABLE`).
    public func tableExists() async throws -> Bool {
        do {
            _ = try await connection.execute(request(NFTablesNetlinkConstant.getTable,
                                                     [.string(NFTablesNetlinkConstant.tableName, table)], dump: false,
                                                     operation: "NFT_MSG_GETTABLE \(family.rawValue) \(table)"))
            return true
        } catch let e as NetlinkError where e.errno == .noSuchFileOrDirectory {
            return false
        }
    }

    /// How many rules `chain` holds (a dump filtered by table and chain in the kernel, so its
    /// cost does not depend on the size of the table). 0 when the chain or table is missing.
    public func ruleCount(chain: String) async throws -> Int {
        do {
            let replies = try await connection.execute(request(
                NFTablesNetlinkConstant.getRule,
                [.string(NFTablesNetlinkConstant.ruleTable, table), .string(NFTablesNetlinkConstant.ruleChain, chain)],
                dump: true, operation: "NFT_MSG_GETRULE \(family.rawValue) \(table) \(chain)"))
            return replies.count
        } catch let e as NetlinkError where e.errno == .noSuchFileOrDirectory {
            return 0
        }
    }

    /// The names of the table's chains (a dump of the family's chains, filtered here).
    public func chainNames() async throws -> Set<String> {
        let replies = try await connection.execute(request(NFTablesNetlinkConstant.getChain, [], dump: true,
                                                           operation: "NFT_MSG_GETCHAIN \(family.rawValue)"))
        var out = Set<String>()
        for m in replies where m.payload.count > 4 {
            let attrs = try NetlinkAttributes(parsing: Array(m.payload.dropFirst(4)))
            guard try attrs.string(NFTablesNetlinkConstant.chainTable) == table,
                  let name = try attrs.string(NFTablesNetlinkConstant.chainName) else { continue }
            out.insert(name)
        }
        return out
    }

    /// The names of the table's named sets and maps (anonymous `__set…` sets left out).
    public func setNames() async throws -> Set<String> {
        let replies: [NetlinkMessage]
        do {
            replies = try await connection.execute(request(NFTablesNetlinkConstant.getSet,
                                                           [.string(NFTablesNetlinkConstant.setTable, table)], dump: true,
                                                           operation: "NFT_MSG_GETSET \(family.rawValue) \(table)"))
        } catch let e as NetlinkError where e.errno == .noSuchFileOrDirectory {
            return []
        }
        var out = Set<String>()
        for m in replies where m.payload.count > 4 {
            let attrs = try NetlinkAttributes(parsing: Array(m.payload.dropFirst(4)))
            guard try attrs.string(NFTablesNetlinkConstant.setTable) == table,
                  let name = try attrs.string(NFTablesNetlinkConstant.setName), !name.hasPrefix("__") else { continue }
            out.insert(name)
        }
        return out
    }
}
