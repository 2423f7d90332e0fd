// swift-tools-version: 6.1
import PackageDescription

let package = Package(
    name: "Sluice",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "sluice", targets: ["sluice"]),
        .library(name: "SluiceCore", targets: ["SluiceCore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.6.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.29.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.25.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.1.0"),
    ],
    targets: [
        // Backend-neutral model: objects, change tracking, endpoint categorisation, sync runner.
        .target(
            name: "SluiceCore",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // kube-proxy's chain-name hash (base32 of SHA-256): the iptables and nftables modes'
        // chain names. The only user of swift-crypto.
        .target(
            name: "ChainHashing",
            dependencies: [
                "SluiceCore",
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // Sources of objects: the manifest directory and the Kubernetes API (list + watch).
        .target(
            name: "KubeAPI",
            dependencies: [
                "SluiceCore",
                .product(name: "Yams", package: "Yams"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        // The kernel kit every mode shares: the iptables tools and their one restorer (flags,
        // lock handling), jump installer, iptables-save reader and version probe, and the one
        // sysctl writer. Each mode declares its own chains, jumps and clean-up with it.
        .target(
            name: "KernelKit",
            dependencies: ["SluiceCore"]
        ),
        // The node and compile flags `sluice` and `sluice-bench-compile` share (one
        // ParsableArguments) and the node configuration derived from them.
        .target(
            name: "ProxyFlags",
            dependencies: [
                "SluiceCore", "KernelKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // iptables-restore compiler (pure) and the backend that applies it.
        .target(
            name: "IPTables",
            dependencies: [
                "SluiceCore", "ChainHashing", "KernelKit",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Userspace mode: SwiftNIO TCP/UDP relays in the process and their portal rules.
        .target(
            name: "Userspace",
            dependencies: [
                "SluiceCore", "IPTables", "KernelKit",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // Health (10256, per-service health-check node ports) and metrics (10249) HTTP servers.
        .target(
            name: "SluiceServer",
            dependencies: [
                "SluiceCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // libnetfilter_conntrack (and the libnfnetlink it is built on), as the system has it.
        .systemLibrary(
            name: "CConntrack",
            pkgConfig: "libnetfilter_conntrack",
            providers: [.apt(["libnetfilter-conntrack-dev"])]
        ),
        // Conntrack: the ctnetlink wrapper, the stale-flow reconciler (a SyncObserver) and the sysctls.
        .target(
            name: "Conntrack",
            dependencies: [
                "SluiceCore", "CConntrack", "Netlink", "KernelKit",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Test helper: runs one reconcile in the network namespace it is started in and reports
        // its memory (the kernel tests run it under `ip netns exec`).
        .executableTarget(
            name: "conntrack-probe",
            dependencies: ["Conntrack", "SluiceCore", .product(name: "Logging", package: "swift-log")],
            path: "Sources/ConntrackProbe"
        ),
        // Benchmark helper: the IPVS mode's cold ipset sync at S Services, in the network
        // namespace it is started in (benchmarks/ipset_cold_sync.py runs it).
        .executableTarget(
            name: "ipset-probe",
            dependencies: ["IPVS", "SluiceCore"],
            path: "Sources/IPSetProbe"
        ),
        // Benchmark helper: the pure half of a sync (snapshot, plan, payload) timed in-process
        // for a manifest directory; benchmarks/sluicebench runs it beside the sluice binary.
        .executableTarget(
            name: "sluice-bench-compile",
            dependencies: [
                "SluiceCore", "KubeAPI", "KernelKit", "ProxyFlags", "IPTables", "IPVS", "NFTables",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/BenchCompile"
        ),
        .executableTarget(
            name: "sluice",
            dependencies: [
                "SluiceCore", "KubeAPI", "KernelKit", "ProxyFlags", "IPTables", "IPVS", "SluiceServer", "Conntrack", "Userspace", "NFTables", "Netlink",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
        // Header-only C module: the netlink, rtnetlink, IPVS and nfnetlink UAPI headers (socket
        // structs; the tests cross-check the Swift constants against the C ones).
        .systemLibrary(name: "CNetlink"),
        // Netlink: message and attribute codec, socket, generic-netlink family lookup.
        .target(name: "Netlink", dependencies: ["CNetlink"]),
        // libipset (the library the `ipset` command is built on): the IPVS mode's sets.
        .systemLibrary(
            name: "CIPSet",
            pkgConfig: "libipset",
            providers: [.apt(["libipset-dev"])]
        ),
        // IPVS mode: IPVS over generic netlink, rtnetlink (kube-ipvs0), ipset through libipset,
        // the pure IPVS compiler and the backend.
        .target(
            name: "IPVS",
            dependencies: [
                "SluiceCore", "Netlink", "KernelKit", "IPTables", "CIPSet",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // nftables mode: the pure compiler to kube-proxy's nftables ruleset (ip/ip6 kube-proxy
        // tables), its full and partial transactions.
        .target(
            name: "NFTables",
            dependencies: [
                "SluiceCore", "CNFTables", "Netlink", "ChainHashing",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // libnftables (the library the `nft` command wraps): the nftables mode applies its
        // transactions in the process.
        .systemLibrary(
            name: "CNFTables",
            pkgConfig: "libnftables",
            providers: [.apt(["libnftables-dev"])]
        ),
        // Test-only helpers: fixtures, fakes, network-namespace test beds.
        .target(
            name: "SluiceTesting",
            dependencies: [
                "SluiceCore", "KubeAPI", "KernelKit", "IPTables", "IPVS", "Userspace", "Netlink",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .testTarget(name: "SluiceCoreTests", dependencies: ["SluiceCore", "SluiceTesting", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "SluiceServerTests", dependencies: ["SluiceServer", "SluiceCore", "SluiceTesting", .product(name: "Logging", package: "swift-log")]),
        .testTarget(
            name: "KubeAPITests",
            dependencies: [
                "KubeAPI", "SluiceCore", "SluiceTesting",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
            ]
        ),
        .testTarget(
            name: "IPTablesTests",
            dependencies: ["IPTables", "KernelKit", "ChainHashing", "SluiceCore", "KubeAPI", "SluiceTesting", .product(name: "Logging", package: "swift-log")],
            resources: [.copy("Fixtures")]
        ),
        .testTarget(name: "ExplainTests", dependencies: ["IPTables", "KernelKit", "IPVS", "Userspace", "SluiceCore", "SluiceTesting"]),
        .testTarget(name: "CLITests", dependencies: ["SluiceTesting", .product(name: "Yams", package: "Yams")], exclude: ["Fixtures"]),
        .testTarget(name: "ConntrackTests", dependencies: ["Conntrack", "CConntrack", "SluiceCore", "SluiceTesting", .product(name: "Logging", package: "swift-log")]),
        .testTarget(
            name: "IPVSTests",
            dependencies: ["IPVS", "Netlink", "CNetlink", "IPTables", "KernelKit", "SluiceCore", "SluiceTesting", .product(name: "Logging", package: "swift-log")],
            exclude: ["Golden"]
        ),
        .testTarget(
            name: "UserspaceTests",
            dependencies: [
                "Userspace", "IPTables", "KernelKit", "SluiceCore", "SluiceTesting",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "NFTablesTests",
            dependencies: ["NFTables", "Netlink", "SluiceCore", "KubeAPI", "SluiceTesting", .product(name: "Logging", package: "swift-log")],
            resources: [.copy("Fixtures")]
        ),
        .testTarget(
            name: "KernelTests",
            dependencies: ["IPTables", "KernelKit", "Userspace", "SluiceCore", "KubeAPI", "SluiceTesting", "sluice", "Conntrack", "conntrack-probe", "ipset-probe",
                           .product(name: "Yams", package: "Yams")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
