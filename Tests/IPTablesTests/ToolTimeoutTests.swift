// A kernel tool that hangs: the real process runner kills it after its time limit, the sync
// fails naming the tool and the limit, the runner counts the failure and retries, and a tool
// that answers again is used by the retry.

import Foundation
import Glibc
import IPTables
import KernelKit
import Logging
import SluiceCore
import SluiceTesting
import Testing

/// A directory of fake iptables tools (shell scripts). `iptables-restore` sleeps while the
/// file `hang` exists in the directory, so a test can make it hang and then recover.
private struct FakeTools {
    let dir: String

    init() throws {
        dir = NSTemporaryDirectory() + "sluice-hang-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try write("iptables", "#!/bin/sh\nexit 0\n")
        try write("iptables-save", "#!/bin/sh\necho '*nat'\necho 'COMMIT'\n")
        try write("iptables-restore", "#!/bin/sh\nif [ -e \"\(dir)/hang\" ]; then exec sleep 600; fi\ncat > \"\(dir)/restored\"\n")
    }

    /// Writes an executable script through a descriptor opened with O_CLOEXEC: tests running
    /// beside this one start processes all the time, and a child that inherited a descriptor
    /// open for writing would make executing the script fail with ETXTBSY while it lives.
    private func write(_ name: String, _ text: String) throws {
        let path = dir + "/" + name
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o755)
        guard fd >= 0 else { throw TestBedError("open \(path): errno \(errno)") }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
            throw TestBedError("write \(path): errno \(errno)")
        }
    }

    func hang(_ on: Bool) {
        if on {
            _ = FileManager.default.createFile(atPath: dir + "/hang", contents: nil)
        } else {
            try? FileManager.default.removeItem(atPath: dir + "/hang")
        }
    }

    var tools: IPTablesTools {
        var t = IPTablesTools(variant: .auto, family: .ipv4)
        t.iptables = dir + "/iptables"
        t.save = dir + "/iptables-save"
        t.restore = dir + "/iptables-restore"
        return t
    }

    func remove() { try? FileManager.default.removeItem(atPath: dir) }
}

@Suite(.serialized) struct ToolTimeoutTests {
    @Test func theProcessRunnerKillsAChildPastItsLimitAndCheckSaysSo() async throws {
        let fake = try FakeTools()
        defer { fake.remove() }
        fake.hang(true)
        let runner = ProcessRunner(timeout: .milliseconds(500))
        let result = await runner.run(fake.tools.restore, ["--noflush"], input: "*nat\nCOMMIT\n")
        let r = try result.get()
        #expect(r.timedOut)
        #expect(r.status == 128 + SIGKILL)
        do {
            _ = try await runner.check(fake.tools.restore, ["--noflush"], input: "*nat\nCOMMIT\n")
            Issue.record("a hung tool must fail")
        } catch {
            #expect(error.timeout == .milliseconds(500))
            #expect(error.command.hasSuffix("iptables-restore --noflush"))
            #expect(error.description.contains("timed out: still running after 500ms, killed"))
        }
    }

    @Test func aHungRestoreFailsTheSyncWhichIsRetriedFully() async throws {
        let fake = try FakeTools()
        defer { fake.remove() }
        fake.hang(true)
        let capture = LogCapture()
        let backend = IPTablesBackend(options: Fixtures.kubeProxyTestOptions, tools: fake.tools,
                                      runner: ProcessRunner(timeout: .milliseconds(500)), logger: capture.logger())
        let clock = ManualClock()
        let runner = SyncRunner(tracker: ChangeTracker(nodeName: "test-node"), backend: backend, clock: clock, logger: capture.logger())
        await runner.handle(.serviceUpserted(Service(namespace: "ns", name: "web", clusterIPs: ["172.30.0.1"], ports: [ServicePort(port: 80)])))
        await runner.handle(.synced)
        await runner.syncOnce()
        #expect(await runner.counters.failures == 1)
        #expect(await runner.counters.syncs == 0)
        let error = await runner.counters.lastError?.description ?? ""
        #expect(error.contains("iptables-restore"))
        #expect(error.contains("timed out"))
        #expect(capture.contains("sync failed"))
        #expect(!FileManager.default.fileExists(atPath: fake.dir + "/restored"))

        // The tool answers again: the retry is a full sync and lands.
        fake.hang(false)
        await runner.syncOnce()
        #expect(await runner.counters.syncs == 1)
        #expect(await runner.counters.fullSyncs == 1)
        let restored = (try? String(contentsOfFile: fake.dir + "/restored", encoding: .utf8)) ?? ""
        #expect(restored.contains("172.30.0.1"))
    }
}
