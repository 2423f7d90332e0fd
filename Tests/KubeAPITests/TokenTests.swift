// Bearer tokens: a rotated token file is re-read (on change, and after a 401), and no token
// ever appears in a log line.

import Foundation
import Glibc
import KubeAPI
import Logging
import SluiceCore
import SluiceTesting
import Testing

private func tempFile(_ content: String) throws -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("sluice-token-\(UUID().uuidString)").path
    try content.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

/// Rewrites a file in place (same inode, same size) and puts its modification time back, so
/// nothing a stat() sees changes.
private func rewriteUnnoticed(_ path: String, _ content: String) throws {
    var before = stat()
    #expect(stat(path, &before) == 0)
    let h = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try h.seek(toOffset: 0)
    try h.write(contentsOf: Data(content.utf8))
    try h.close()
    var times = [before.st_atim, before.st_mtim]
    #expect(utimensat(AT_FDCWD, path, &times, 0) == 0)
}

@Suite struct TokenTests {
    @Test func aTokenFileIsReReadWhenItChangesAndAfterA401() throws {
        let path = try tempFile("token-one\n")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let provider = TokenProvider(credentials: .tokenFile(path), maximumAge: .seconds(3600), logger: Logger(label: "t"))
        #expect(provider.authorization() == "Bearer token-one")
        #expect(provider.authorization() == "Bearer token-one")
        #expect(provider.fileReads == 1)

        // A rotation stat() can see (kubelet swaps a symlink, or the size changes): re-read at once.
        try "token-three-longer\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(provider.authorization() == "Bearer token-three-longer")

        // A rotation stat() cannot see: the cached token is used until the server refuses it.
        try "token-four\n".write(toFile: path, atomically: true, encoding: .utf8)
        #expect(provider.authorization() == "Bearer token-four")
        try rewriteUnnoticed(path, "token-five\n")
        #expect(provider.authorization() == "Bearer token-four")
        provider.invalidate()
        #expect(provider.authorization() == "Bearer token-five")

        // An unreadable file keeps the last good token.
        try FileManager.default.removeItem(atPath: path)
        provider.invalidate()
        #expect(provider.authorization() == "Bearer token-five")
    }

    @Test func anExpiredTokenIsReReadAndTheWatchCarriesOn() async throws {
        let path = try tempFile("token-one\n")
        defer { try? FileManager.default.removeItem(atPath: path) }
        try await withHarness(credentials: .tokenFile(path), configure: { s in
            s.requireToken("token-one")
            s.apply(.services, FakeObjects.service("before", clusterIP: "10.96.0.1"))
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("watching") { h.server.watchCount() == 4 }
            // The token expires: the server refuses it and cuts the streams; the client gets 401s...
            h.server.requireToken("token-two")
            h.server.dropConnections()
            try await Eventually.wait("a 401") { h.server.requests.contains { $0.status == 401 } }
            // ...until kubelet writes the new token, in place and unnoticeable by stat().
            try rewriteUnnoticed(path, "token-two\n")
            h.service("after", "10.96.0.2")
            try await h.waitForServicesInStep("events flow again with the re-read token")
            #expect(h.server.requests.contains { $0.token == "token-two" && $0.status == 200 })
            let firstRefusal = try #require(h.server.requests.firstIndex { $0.status == 401 })
            #expect(h.server.requests[firstRefusal...].contains { $0.token == "token-two" && $0.status == 200 })
            #expect(h.client.tokens.fileReads >= 2)
            #expect(!h.logs.contains("token-one") && !h.logs.contains("token-two"))
        }
    }

    @Test func tokensNeverReachTheLogs() async throws {
        let secret = "s3cr3t-b34r3r-t0k3n-value"
        try await withHarness(credentials: .bearerToken(Secret(secret)), configure: { s in
            s.requireToken(secret)
            s.failNext(2, status: 401, kind: .list, resource: .services)
            s.failNext(1, status: 403, kind: .watch, resource: .endpointslices)
            s.failNext(1, status: 500, kind: .list, resource: .nodes)
            s.apply(.services, FakeObjects.service("a", clusterIP: "10.96.0.1"))
        }) { h in
            try await h.recorder.wait("synced") { $0.synced }
            try await Eventually.wait("the 403 happened") { h.server.requests.contains { $0.status == 403 } }
            h.server.dropConnections()
            h.server.requireToken("a-different-one")
            try await Eventually.wait("a refused reconnect") { h.server.requests.filter { $0.status == 401 }.count >= 3 }
            let lines = h.logs.lines
            #expect(lines.count > 5)
            #expect(lines.contains { $0.contains("401") })
            #expect(!lines.contains { $0.contains(secret) })
            #expect(!lines.contains { $0.contains("s3cr3t") })
            #expect(!h.client.config.description.contains("s3cr3t"))
        }
    }
}
