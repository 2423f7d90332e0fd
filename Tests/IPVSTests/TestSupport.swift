// Helpers shared by the IPVS tests.

import Foundation
import Netlink

/// Hex of `bytes` in groups of 4 bytes, for readable failure messages.
func grouped(_ bytes: [UInt8]) -> String {
    stride(from: 0, to: bytes.count, by: 4).map { hexString(Array(bytes[$0..<min($0 + 4, bytes.count)])) }.joined(separator: " ")
}

/// The repository root (three levels above this file).
let repositoryRoot: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// The sluice binary: `$SLUICE_BIN`, else `.build/debug/sluice` in the repository.
var sluiceBinary: String {
    if let p = ProcessInfo.processInfo.environment["SLUICE_BIN"], !p.isEmpty { return p }
    return repositoryRoot.appendingPathComponent(".build/debug/sluice").path
}

/// True when running as root.
var isRoot: Bool { geteuid() == 0 }

import Logging

/// A logger that drops everything (the backend logs every sync at info level).
let quietLogger = Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
