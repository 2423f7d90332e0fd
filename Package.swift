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
    ],
    targets: [
        // Backend-neutral model: objects, change tracking, endpoint categorisation, sync runner.
        .target(
            name: "SluiceCore",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // Sources of objects: the manifest directory (and, later, the Kubernetes API).
        .target(
            name: "KubeAPI",
            dependencies: [
                "SluiceCore",
                .product(name: "Yams", package: "Yams"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // iptables-restore compiler (pure) and the backend that applies it.
        .target(
            name: "IPTables",
            dependencies: [
                "SluiceCore",
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
                "SluiceCore", "CConntrack",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Test helper: runs one reconcile in the network namespace it is started in and reports
        // its memory (the kernel tests run it under `ip netns exec`).
        .executableTarget(
            name: "conntrack-probe",
            dependencies: ["Conntrack", "SluiceCore"],
            path: "Sources/ConntrackProbe"
        ),
        .executableTarget(
            name: "sluice",
            dependencies: [
                "SluiceCore", "KubeAPI", "IPTables", "Conntrack",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // Test-only helpers: fixtures, fakes, network-namespace test beds.
        .target(
            name: "SluiceTesting",
            dependencies: ["SluiceCore", "KubeAPI", "IPTables"]
        ),
        .testTarget(name: "SluiceCoreTests", dependencies: ["SluiceCore", "SluiceTesting"]),
        .testTarget(name: "KubeAPITests", dependencies: ["KubeAPI", "SluiceCore", "SluiceTesting"]),
        .testTarget(
            name: "IPTablesTests",
            dependencies: ["IPTables", "SluiceCore", "KubeAPI", "SluiceTesting"],
            resources: [.copy("Fixtures")]
        ),
        .testTarget(name: "ConntrackTests", dependencies: ["Conntrack", "CConntrack", "SluiceCore", "SluiceTesting"]),
        .testTarget(
            name: "KernelTests",
            dependencies: ["IPTables", "SluiceCore", "KubeAPI", "SluiceTesting", "sluice", "Conntrack", "conntrack-probe"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
