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
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
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
        // Userspace mode: SwiftNIO TCP/UDP relays in the process and their portal rules.
        .target(
            name: "Userspace",
            dependencies: [
                "SluiceCore", "IPTables",
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
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "sluice",
            dependencies: [
                "SluiceCore", "KubeAPI", "IPTables", "SluiceServer", "Userspace",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // Test-only helpers: fixtures, fakes, network-namespace test beds.
        .target(
            name: "SluiceTesting",
            dependencies: [
                "SluiceCore", "KubeAPI", "IPTables",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .testTarget(name: "SluiceCoreTests", dependencies: ["SluiceCore", "SluiceTesting"]),
        .testTarget(name: "SluiceServerTests", dependencies: ["SluiceServer", "SluiceCore", "SluiceTesting"]),
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
            dependencies: ["IPTables", "SluiceCore", "KubeAPI", "SluiceTesting"],
            resources: [.copy("Fixtures")]
        ),
        .testTarget(
            name: "UserspaceTests",
            dependencies: [
                "Userspace", "IPTables", "SluiceCore", "SluiceTesting",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "KernelTests",
            dependencies: ["IPTables", "SluiceCore", "KubeAPI", "SluiceTesting", "sluice"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
