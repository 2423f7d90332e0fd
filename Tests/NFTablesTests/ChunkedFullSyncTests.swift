// The chunked full sync (NFTFullSyncPlan): its transactions, applied in order to an empty
// table, give the table of the one-transaction full sync; after each of them every element
// and rule points at a chain that is complete; a Service never spans two transactions; when
// the plan is one transaction; the backend's failed chunk.

import Foundation
import Logging
import Netlink
import NFTables
import SluiceCore
import SluiceTesting
import Testing

/// Service ports of every kind, `count` Services (some with two ports): ClusterIP, affinity,
/// NodePort, LoadBalancer with source ranges, external IPs, Local policies without local
/// endpoints, no endpoints, and two Services claiming the same external IP and port.
func mixedState(_ count: Int) -> ProxyState {
    var ports: [(ServicePortInfo, [EndpointInfo])] = []
    for i in 0..<count {
        let n = String(format: "s%03d", i)
        let a = spn("ns\(i % 3)", n)
        let cip = "172.30.\(i / 200).\(i % 200 + 1)"
        let e1 = "10.0.\(i / 200).\(i % 200 + 1)", e2 = "10.1.\(i / 200).\(i % 200 + 1)"
        switch i % 8 {
        case 0: ports.append((svc(a, cip), [ep(e1), ep(e2)]))
        case 1: ports.append((svc(a, cip, affinity: 300), [ep(e1), ep(e2)]))
        case 2:
            ports.append((svc(a, cip, nodePort: 30000 + i), [ep(e1, local: true), ep(e2)]))
            ports.append((svc(spn("ns\(i % 3)", n, "p53", .udp), cip, port: 53, nodePort: 31000 + i), [ep(e1)]))
        case 3:
            ports.append((svc(a, cip, nodePort: 30000 + i, lb: ["5.5.\(i / 200).\(i % 200 + 1)"], sourceRanges: ["203.0.113.0/25"]),
                          [ep(e1), ep(e2)]))
        case 4: ports.append((svc(a, cip, externalIPs: ["192.168.99.\(i % 200 + 1)"]), [ep(e1)]))
        case 5: ports.append((svc(a, cip, nodePort: 30000 + i, eTPLocal: true, iTPLocal: true), [ep(e1)]))
        case 6: ports.append((svc(a, cip), []))
        default:
            // The same external IP and port as the Service before the previous one (i - 3 ≡ 4):
            // two claims on one key; the smallest service port wins.
            ports.append((svc(a, cip, externalIPs: ["192.168.99.\((i - 3) % 200 + 1)"]), [ep(e1), ep(e2)]))
        }
    }
    return makeState(ports)
}

/// Lines of an `nft -f` text without comments.
private func commandLines(_ text: String) -> String {
    text.split(separator: "\n").filter { !$0.hasPrefix("#") }.joined(separator: "\n") + "\n"
}

@Suite("nftables chunked full sync (plan)")
struct ChunkedFullSyncPlanTests {
    let options = KubeProxyFake.options()

    @Test("Chunks applied in order to an empty table give the one-transaction table; after each, every reference is to a complete chain", arguments: [1, 3, 7, 40])
    func chunksEqualOneTransaction(servicesPerChunk: Int) throws {
        let state = mixedState(40)
        let ruleset = NFTablesCompiler(options: options).compile(state)
        var whole = NFTModel()
        try whole.apply(ruleset.fullTransaction().text)

        let plan = NFTFullSyncPlan(ruleset: ruleset, chunking: NFTFullSyncChunking(servicesPerChunk: servicesPerChunk))
        let ports = ruleset.services.count
        #expect(plan.isChunked == (servicesPerChunk < ports))
        var model = NFTModel()
        for (i, tx) in plan.transactions().enumerated() {
            try model.apply(tx.text)
            // Every chain a rule or an element points at holds its final rules already.
            var referenced = Set<String>()
            for c in model.chains.values { for r in c.rules { referenced.formUnion(NFTModel.chainRefs(r)) } }
            for m in model.containers.values { for v in m.values.values { referenced.formUnion(NFTModel.chainRefs(v)) } }
            for c in referenced {
                #expect(model.chains[c]?.rules == whole.chains[c]?.rules, "transaction \(i + 1): \(c) is referenced but not complete")
            }
            // Every element present is final.
            for (name, m) in model.containers {
                for (k, body) in m.elements { #expect(whole.containers[name]?.elements[k] == body, "transaction \(i + 1): \(name) \(k)") }
            }
        }
        #expect(sortNFT(model.dump()) == sortNFT(whole.dump()), "\(firstDifference(sortNFT(model.dump()), sortNFT(whole.dump())) ?? "")")
        // The printed plan (what `sluice compile` writes), as one `nft -f`, gives the same table.
        var once = NFTModel()
        try once.apply(commandLines(plan.text()))
        #expect(once == whole || sortNFT(once.dump()) == sortNFT(whole.dump()))
        if plan.isChunked {
            #expect(plan.steps.count >= 2 && plan.steps.first == .fixed)
            #expect(plan.text().contains("# transaction 2 of \(plan.steps.count)\n"))
        } else {
            #expect(plan.text() == ruleset.fullTransaction().text)
        }
    }

    @Test("Every service step holds whole Services: their chains, their affinity sets and the elements that name their chains")
    func chunkBoundariesKeepServicesWhole() throws {
        let ruleset = NFTablesCompiler(options: options).compile(mixedState(40))
        let plan = NFTFullSyncPlan(ruleset: ruleset, chunking: NFTFullSyncChunking(servicesPerChunk: 3))
        var seenServices = Set<NamespacedName>()
        var chainsBefore = Set<String>()
        var covered = 0
        for (i, step) in plan.steps.enumerated() {
            let tx = plan.transaction(i)
            guard case .services(let range) = step else {
                #expect(step == .fixed && i == 0)
                #expect(tx.writtenChains.isEmpty, "the fixed step writes no service chain")
                #expect(tx.commands.allSatisfy { !$0.hasPrefix("add element ") || $0.contains(" nodeport-ips ") },
                        "the fixed step adds no service element")
                continue
            }
            covered += range.count
            #expect(range.count >= 3 || range.upperBound == plan.ports.count, "a chunk is cut only after 3 service ports")
            let services = Set(plan.ports[range].map(\.service))
            #expect(seenServices.isDisjoint(with: services), "a Service's ports span two transactions: \(services.intersection(seenServices))")
            seenServices.formUnion(services)
            var mine = Set<String>()
            for p in plan.ports[range] { mine.formUnion(ruleset.services[p]!.chainNames) }
            #expect(Set(tx.writtenChains) == mine)
            for line in tx.commands where line.hasPrefix("add element ") {
                for c in NFTModel.chainRefs(line) where c.contains("/") {
                    #expect(mine.contains(c) || chainsBefore.contains(c), "transaction \(i + 1): \(line) names a chain written later")
                }
            }
            chainsBefore.formUnion(mine)
        }
        #expect(covered == ruleset.services.count)
        // Every element of the ruleset is sent exactly once.
        let sent = plan.transactions().flatMap(\.commands).filter { $0.hasPrefix("add element ") && !$0.contains(" nodeport-ips ") }
        #expect(sent.count == ruleset.elements.count)
    }

    @Test("One transaction: chunking off, few Services, or a table that holds service chains; chunked over a table with only fixed chains")
    func whenChunked() {
        let ruleset = NFTablesCompiler(options: options).compile(mixedState(10))
        #expect(!NFTFullSyncPlan(ruleset: ruleset, chunking: .off).isChunked)
        #expect(!NFTFullSyncPlan(ruleset: ruleset, chunking: NFTFullSyncChunking(servicesPerChunk: 100)).isChunked)
        let some = NFTFullSyncChunking(servicesPerChunk: 2)
        #expect(NFTFullSyncPlan(ruleset: ruleset, chunking: some).isChunked)
        let fixedOnly = NFTExistingObjects(chains: ["services", "nat-prerouting", "filter-prerouting"], sets: ["service-ips"])
        let plan = NFTFullSyncPlan(ruleset: ruleset, recreateBaseChains: true, existing: fixedOnly, chunking: some)
        #expect(plan.isChunked)
        // The fixed step removes another layout's fixed chain, as the one transaction does.
        #expect(plan.transaction(0).commands.contains("delete chain ip kube-proxy filter-prerouting"))
        let serving = NFTExistingObjects(chains: ["services", Array(ruleset.serviceChainNames).first!], sets: [])
        let over = NFTFullSyncPlan(ruleset: ruleset, existing: serving, chunking: some)
        #expect(!over.isChunked && over.steps == [.whole])
        #expect(over.transaction(0).text == ruleset.fullTransaction(existing: serving).text)
    }

    @Test("SLUICE_NFT_CHUNK_SERVICES sets the chunk size; absent or not a number gives the default")
    func environment() {
        #expect(NFTFullSyncChunking.from(environment: [:]) == .default)
        #expect(NFTFullSyncChunking.from(environment: ["SLUICE_NFT_CHUNK_SERVICES": "250"]).servicesPerChunk == 250)
        #expect(NFTFullSyncChunking.from(environment: ["SLUICE_NFT_CHUNK_SERVICES": "0"]) == .off)
        #expect(NFTFullSyncChunking.from(environment: ["SLUICE_NFT_CHUNK_SERVICES": "many"]) == .default)
        #expect(NFTFullSyncChunking.default.servicesPerChunk > 0)
    }
}

@Suite("nftables chunked full sync (backend, fake kernel)")
struct ChunkedFullSyncBackendTests {
    let kernel = FakeNFTablesKernel()

    func backend() -> NFTablesBackend {
        NFTablesBackend(compiler: NFTablesCompiler(options: KubeProxyFake.options()), kernel: kernel, logger: Logger(label: "test"),
                        fullSyncPeriod: .zero, chunking: NFTFullSyncChunking(servicesPerChunk: 5))
    }

    @Test("Into an empty table the full sync goes as several transactions; a failed chunk fails the sync, and the next full sync over the half-built table is one transaction")
    func failedChunkThenOneTransaction() async throws {
        let b = backend()
        let state = mixedState(30)
        let ruleset = NFTablesCompiler(options: KubeProxyFake.options()).compile(state)
        let plan = NFTFullSyncPlan(ruleset: ruleset, recreateBaseChains: true, chunking: NFTFullSyncChunking(servicesPerChunk: 5))
        #expect(plan.steps.count > 3)

        kernel.failNext([false, false, true])
        await #expect(throws: NFTablesError.self) { try await b.sync(state, kind: .full) }
        #expect(kernel.applied.count == 2, "the fixed step and the first service step were applied, then the sync stopped")
        #expect(await b.syncFailures == 1)

        // The kernel now holds the first chunk's Services: the next sync (asked partial) is full,
        // and as the table serves Services, one transaction.
        var model = NFTModel()
        for t in kernel.applied { try model.apply(t) }
        kernel.setInventory(chains: Set(model.chains.keys), sets: Set(model.containers.keys))
        let report = try await b.sync(state, kind: .partial(changed: []))
        #expect(report.full)
        #expect(kernel.applied.count == 3)
        try model.apply(kernel.applied[2])
        var whole = NFTModel()
        try whole.apply(ruleset.fullTransaction().text)
        #expect(sortNFT(model.dump()) == sortNFT(whole.dump()))
    }

    @Test("A chunked first sync applies every step in order and leaves the one-transaction table; the next sync is partial")
    func chunkedFirstSync() async throws {
        let b = backend()
        let state = mixedState(30)
        let report = try await b.sync(state, kind: .full)
        #expect(report.full)
        let applied = kernel.applied
        #expect(applied.count > 3)
        var model = NFTModel()
        for t in applied { try model.apply(t) }
        var whole = NFTModel()
        try whole.apply(NFTablesCompiler(options: KubeProxyFake.options()).compile(state).fullTransaction().text)
        #expect(sortNFT(model.dump()) == sortNFT(whole.dump()))
        #expect(report.bytes == applied.reduce(0) { $0 + $1.utf8.count })
        let again = try await b.sync(state, kind: .partial(changed: []))
        #expect(!again.full)
    }
}

/// The real kernel behind the backend, with the `failing`-th main transaction (1-based, counted
/// over every `apply`) refused before it is sent.
final class FailingKernel: NFTablesKernel, @unchecked Sendable {
    let inner: LibNFTablesKernel
    private let lock = NSLock()
    private var count = 0
    private var failing: Int?

    init(_ inner: LibNFTablesKernel) { self.inner = inner }

    func fail(at n: Int?) { lock.withLock { count = 0; failing = n } }
    var applies: Int { lock.withLock { count } }

    func apply(_ text: String, operation: String) async throws { try await inner.apply(text, operation: operation) }
    func apply(_ transaction: NFTTransaction, operation: String) async throws {
        let fail = lock.withLock { () -> Bool in
            count += 1
            return count == failing
        }
        if fail { throw NFTablesError(operation: operation, message: "injected failure", status: 1) }
        try await inner.apply(transaction, operation: operation)
    }
    func inventory() async throws -> (chains: Set<String>, sets: Set<String>) { try await inner.inventory() }
    func chainHasRules(_ chain: String) async throws -> Bool { try await inner.chainHasRules(chain) }
    var sendsFullTransactionsAsNetlink: Bool { inner.sendsFullTransactionsAsNetlink }
    var sendsChunkedTransactionsAsNetlink: Bool { inner.sendsChunkedTransactionsAsNetlink }
}

/// The chunked full sync against the host's nf_tables, in scratch namespaces.
@Suite("nftables chunked full syncs in the kernel", .serialized,
       .enabled(if: getuid() == 0 && ToolRunner.which("nft") != nil, "needs root and nft"))
struct ChunkedFullSyncKernelTests {
    private func listing(_ ns: TestNamespace) async throws -> String {
        NFTablesListing.normalise(try await ns.exec(checked: ["nft", "list", "table", "ip", "kube-proxy"]).stdout)
    }

    @Test("The backend's chunked first sync (netlink), and `nft -f` of the printed plan, give the table of `nft -f` of the one transaction")
    func chunkedEqualsOneTransaction() async throws {
        let state = mixedState(40)
        let ruleset = NFTablesCompiler(options: KubeProxyFake.options()).compile(state)
        let chunking = NFTFullSyncChunking(servicesPerChunk: 4)
        let plan = NFTFullSyncPlan(ruleset: ruleset, chunking: chunking)
        #expect(plan.steps.count > 5)
        try await TestNamespace.with(label: "chunkA") { a in
            try await TestNamespace.with(label: "chunkB") { b in
                try await TestNamespace.with(label: "chunkC") { c in
                    let kernel = FailingKernel(try await a.run { try LibNFTablesKernel(family: .ip, lib: try LibNFTables()) })
                    #expect(kernel.sendsChunkedTransactionsAsNetlink)
                    let backend = NFTablesBackend(compiler: NFTablesCompiler(options: KubeProxyFake.options()), kernel: kernel,
                                                  logger: Logger(label: "test"), chunking: chunking)
                    let report = try await backend.sync(state, kind: .full)
                    #expect(report.full && kernel.applies == plan.steps.count)
                    try await b.exec(checked: ["nft", "-f", "-"], input: ruleset.fullTransaction().text)
                    try await c.exec(checked: ["nft", "-f", "-"], input: plan.text())
                    let want = try await listing(b)
                    let got = try await listing(a)
                    #expect(got == want, "\(firstDifference(got, want) ?? "")")
                    #expect(try await listing(c) == want)
                    // A second sync over it is partial and changes nothing.
                    let again = try await backend.sync(state, kind: .partial(changed: []))
                    #expect(!again.full)
                    #expect(try await listing(a) == want)
                }
            }
        }
    }

    @Test("A chunk the kernel refuses fails the sync and leaves whole Services; the next sync is full, one transaction, and repairs the table")
    func failedChunkIsRepaired() async throws {
        let state = mixedState(40)
        let ruleset = NFTablesCompiler(options: KubeProxyFake.options()).compile(state)
        let chunking = NFTFullSyncChunking(servicesPerChunk: 4)
        let plan = NFTFullSyncPlan(ruleset: ruleset, recreateBaseChains: true, chunking: chunking)
        try await TestNamespace.with(label: "chunkfail") { a in
            try await TestNamespace.with(label: "chunkref") { b in
                let kernel = FailingKernel(try await a.run { try LibNFTablesKernel(family: .ip, lib: try LibNFTables()) })
                let backend = NFTablesBackend(compiler: NFTablesCompiler(options: KubeProxyFake.options()), kernel: kernel,
                                              logger: Logger(label: "test"), chunking: chunking)
                kernel.fail(at: 4)
                await #expect(throws: NFTablesError.self) { try await backend.sync(state, kind: .full) }
                #expect(kernel.applies == 4)
                // What the first three transactions left, applied by hand elsewhere: the same table.
                for i in 0..<3 { try await b.exec(checked: ["nft", "-f", "-"], input: plan.transaction(i).text) }
                let half = try await listing(a)
                #expect(half == (try await listing(b)))
                // Whole Services only: every service chain in the kernel has its rules.
                let raw = try await a.exec(checked: ["nft", "list", "table", "ip", "kube-proxy"]).stdout
                #expect(NFTablesListing.emptyServiceChains(raw).isEmpty, "empty service chains after the failed chunk")
                guard case .services(let second) = plan.steps[2] else { Issue.record("step 3 is not a service step"); return }
                for p in plan.ports[second] {
                    for chain in ruleset.services[p]!.chainNames { #expect(raw.contains("chain \(chain) {")) }
                }

                kernel.fail(at: nil)
                let report = try await backend.sync(state, kind: .partial(changed: []))
                #expect(report.full)
                #expect(kernel.applies == 1, "the repair over a table with service chains is one transaction")
                let ref = try await TestNamespace.with(label: "chunkwhole") { c in
                    try await c.exec(checked: ["nft", "-f", "-"], input: ruleset.fullTransaction().text)
                    return try await listing(c)
                }
                #expect(try await listing(a) == ref)
            }
        }
    }
}

@Suite("netlink batch buffer growth")
struct NetlinkBufferGrowthTests {
    @Test("Appending 20 000 messages to one buffer reallocates it a logarithmic number of times, not once per message")
    func appendIsAmortised() {
        var out: [UInt8] = []
        var reallocations = 0
        var capacity = out.capacity
        let message = NetlinkMessage(type: 0x0a06, flags: [.request], payload: Array(repeating: 7, count: 100))
        for _ in 0..<20_000 {
            message.encode(into: &out)
            if out.capacity != capacity {
                reallocations += 1
                capacity = out.capacity
            }
        }
        #expect(out.count == 20_000 * 116)
        #expect(reallocations < 40, "\(reallocations) reallocations")
    }
}
