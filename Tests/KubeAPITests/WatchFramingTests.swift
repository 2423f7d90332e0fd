// Watch stream framing, backoff arithmetic, and what the proxy takes from its Node.

import Foundation
import KubeAPI
import SluiceCore
import Testing

private let events = [
    #"{"type":"ADDED","object":{"kind":"Service","metadata":{"name":"a","annotations":{"x":"}{\"quoted\" \\ brace"}}}}"#,
    #"{"type":"MODIFIED","object":{"kind":"Service","metadata":{"name":"b"},"spec":{"ports":[{"port":1}]}}}"#,
    #"{"type":"BOOKMARK","object":{"kind":"Service","metadata":{"resourceVersion":"42"}}}"#,
]

@Suite struct JSONFrameSplitterTests {
    private func objects(_ frames: [JSONFrameSplitter.Frame]) -> [String] {
        frames.compactMap { if case .object(let b) = $0 { String(decoding: b, as: UTF8.self) } else { nil } }
    }

    @Test func everySplitPointGivesTheSameEvents() {
        let stream = Array(events.map { $0 + "\n" }.joined().utf8)
        for cut in 1..<stream.count {
            var s = JSONFrameSplitter()
            let frames = s.append(stream[..<cut]) + s.append(stream[cut...]) + s.finish()
            #expect(objects(frames) == events, "cut at \(cut)")
            #expect(frames.count == events.count)
        }
    }

    @Test func byteAtATime() {
        var s = JSONFrameSplitter()
        var frames: [JSONFrameSplitter.Frame] = []
        for b in events.map({ $0 + "\n" }).joined().utf8 { frames += s.append([b]) }
        #expect(objects(frames) == events)
        #expect(s.pendingBytes == 0)
    }

    @Test func severalEventsInOneChunkWithOrWithoutNewlines() {
        var s = JSONFrameSplitter()
        #expect(objects(s.append(Array(events.joined().utf8))) == events)
        #expect(objects(s.append(Array(events.joined(separator: "\r\n").utf8))) == events)
    }

    @Test func aMalformedEventCostsOnlyItself() {
        var s = JSONFrameSplitter()
        let text = events[0] + "\n" + #"{"type":"ADDED","object":{"broken"# + "\n" + "garbage here\n" + events[1] + "\n"
        let frames = s.append(Array(text.utf8))
        #expect(objects(frames) == [events[0], events[1]])
        let malformed = frames.filter { if case .malformed = $0 { true } else { false } }
        #expect(malformed.count == 2)
    }

    @Test func aStreamEndingMidEventReportsIt() {
        var s = JSONFrameSplitter()
        #expect(s.append(Array(#"{"type":"ADD"#.utf8)).isEmpty)
        guard case .malformed(let reason, _) = s.finish().first else {
            Issue.record("no malformed frame")
            return
        }
        #expect(reason.contains("ended"))
    }

    @Test func oversizedEventsAreDropped() {
        var s = JSONFrameSplitter(maximumFrameBytes: 200)
        let big = #"{"type":"ADDED","object":{"data":""# + String(repeating: "x", count: 500) + #""}}"#
        let frames = s.append(Array((big + "\n" + events[1] + "\n").utf8))
        #expect(objects(frames) == [events[1]])
        #expect(frames.count == 2)
    }
}

@Suite struct BackoffTests {
    @Test func growsThenCapsWithJitterInTheUpperHalf() {
        let p = BackoffPolicy(initial: .milliseconds(800), maximum: .seconds(30), factor: 2)
        #expect(p.delay(attempt: 1, random: 1) == .milliseconds(800))
        #expect(p.delay(attempt: 1, random: 0) == .milliseconds(400))
        #expect(p.delay(attempt: 2, random: 1) == .milliseconds(1600))
        #expect(p.delay(attempt: 3, random: 0.5) == .milliseconds(2400))
        #expect(p.delay(attempt: 6, random: 1) == .milliseconds(25600))
        #expect(p.delay(attempt: 7, random: 1) == .seconds(30))
        #expect(p.delay(attempt: 1000, random: 1) == .seconds(30))
        #expect(p.delay(attempt: 1000, random: 0) == .seconds(15))
        for a in 1...40 {
            let d = p.delay(attempt: a, random: Double(a % 7) / 7)
            #expect(d > .zero && d <= .seconds(30))
        }
    }
}

@Suite struct NodeInfoTests {
    private let node = Node(name: "n1", addresses: [("Hostname", "n1"), ("ExternalIP", "203.0.113.5"), ("InternalIP", "10.0.0.5"),
                                                      ("InternalIP", "fd00::5"), ("InternalIP", "10.0.0.6")],
                            podCIDRs: ["10.244.1.0/24", "fd00:244:1::/64"])

    @Test func hostIPsPreferInternalThenOneOfEachFamily() {
        #expect(node.hostIPs.map(\.description) == ["10.0.0.5", "fd00::5"])
        let external = Node(name: "n2", addresses: [("ExternalIP", "203.0.113.5")])
        #expect(external.hostIPs.map(\.description) == ["203.0.113.5"])
        #expect(node.podCIDRValues.count == 2)
    }

    @Test func changesThatNeedARestart() {
        let dep = NodeDependency(nodeName: "n1", nodeIPs: node.hostIPs, podCIDRs: node.podCIDRs)
        #expect(dep.change(in: node) == nil)
        var moved = node
        moved.addresses = [("InternalIP", "10.0.0.9")]
        #expect(dep.change(in: moved)?.contains("IPs changed") == true)
        var recidr = node
        recidr.podCIDRs = ["10.244.9.0/24"]
        #expect(dep.change(in: recidr)?.contains("podCIDRs changed") == true)
        var relabelled = node
        relabelled.labels = ["topology.kubernetes.io/zone": "b"]
        #expect(dep.change(in: relabelled) == nil)
        var empty = node
        empty.addresses = []
        empty.podCIDRs = []
        #expect(dep.change(in: empty) == nil)
        #expect(NodeDependency(nodeName: "n1").change(in: moved) == nil)
        #expect(dep.change(in: Node(name: "other")) == nil)
    }

    @Test func theGuardEndsTheStreamWhenTheNodeChanges() async throws {
        let dep = NodeDependency(nodeName: "n1", podCIDRs: ["10.244.1.0/24"])
        let (upstream, c) = AsyncThrowingStream<ObjectEvent, Error>.makeStream()
        var recidr = node
        recidr.podCIDRs = ["10.244.9.0/24"]
        c.yield(.synced)
        c.yield(.nodeUpserted(Node(name: "n1", podCIDRs: ["10.244.1.0/24"])))
        c.yield(.nodeUpserted(recidr))
        var seen: [ObjectEvent] = []
        do {
            for try await e in dep.guarding(upstream) { seen.append(e) }
            Issue.record("the stream ended without an error")
        } catch let e as NodeChanged {
            #expect(e.description.contains("10.244.9.0/24"))
        }
        #expect(seen.count == 2)
    }
}
