// The userspace load balancer: round robin, ClientIP affinity with its timeout, retries,
// endpoint updates. Time is explicit, so no test waits.

import SluiceCore
import Testing
import Userspace

private func ep(_ last: Int) -> EndpointInfo { EndpointInfo(ip: IPAddress("10.244.0.\(last)")!, port: 8080) }
private let alice = IPAddress("10.244.9.1")!
private let bob = IPAddress("10.244.9.2")!

@Suite struct LoadBalancerTests {
    @Test func roundRobinVisitsEveryEndpointInTurn() {
        var lb = LoadBalancer(endpoints: [ep(1), ep(2), ep(3)])
        let picks = (0..<7).compactMap { _ in lb.next(client: alice, now: .zero)?.ip.description }
        #expect(picks == ["10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.1", "10.244.0.2", "10.244.0.3", "10.244.0.1"])
    }

    @Test func noEndpointsNoChoice() {
        var lb = LoadBalancer()
        #expect(lb.next(client: alice, now: .zero) == nil)
    }

    @Test func affinityPinsEachClientUntilItsTimeoutPasses() {
        var lb = LoadBalancer(endpoints: [ep(1), ep(2), ep(3)], affinityTimeout: .seconds(10800))
        #expect(lb.next(client: alice, now: .zero) == ep(1))
        #expect(lb.next(client: bob, now: .seconds(1)) == ep(2))
        // Sliding: every use within the timeout renews the pin, for longer than one timeout.
        for t in stride(from: 100, through: 30_100, by: 3000) {
            #expect(lb.next(client: alice, now: .seconds(t)) == ep(1))
        }
        #expect(lb.next(client: alice, now: .seconds(30_100 + 10_799)) == ep(1))
        // 10800 s without a connection: the pin has expired and round robin resumes (ep(3) is next).
        #expect(lb.next(client: alice, now: .seconds(30_100 + 10_799 + 10_800)) == ep(3))
    }

    @Test func expiredPinFallsBackToRoundRobin() {
        var lb = LoadBalancer(endpoints: [ep(1), ep(2)], affinityTimeout: .seconds(60))
        #expect(lb.next(client: alice, now: .zero) == ep(1))
        #expect(lb.next(client: alice, now: .seconds(59)) == ep(1))
        // 60 s after the last use: expired; the next in turn is ep(2), and the pin moves there.
        #expect(lb.next(client: alice, now: .seconds(119)) == ep(2))
        #expect(lb.next(client: alice, now: .seconds(120)) == ep(2))
        lb.removeExpired(now: .seconds(1000))
        #expect(lb.pinnedClients == 0)
    }

    @Test func resetAffinityTakesTheNextEndpointAndMovesThePin() {
        var lb = LoadBalancer(endpoints: [ep(1), ep(2)], affinityTimeout: .seconds(60))
        #expect(lb.next(client: alice, now: .zero) == ep(1))
        // ep(1) refused the connection: the retry goes to ep(2) and alice now sticks there.
        #expect(lb.next(client: alice, now: .seconds(1), resetAffinity: true) == ep(2))
        #expect(lb.next(client: alice, now: .seconds(2)) == ep(2))
    }

    @Test func withoutAffinityClientsAreNotPinned() {
        var lb = LoadBalancer(endpoints: [ep(1), ep(2)])
        #expect(lb.next(client: alice, now: .zero) == ep(1))
        #expect(lb.next(client: alice, now: .zero) == ep(2))
        #expect(lb.pinnedClients == 0)
    }

    @Test func updateKeepsPinsToRemainingEndpointsOnly() {
        var lb = LoadBalancer(endpoints: [ep(1), ep(2)], affinityTimeout: .seconds(60))
        #expect(lb.next(client: alice, now: .zero) == ep(1))
        #expect(lb.next(client: bob, now: .zero) == ep(2))
        lb.update(endpoints: [ep(2), ep(3)], affinityTimeout: .seconds(60))
        #expect(lb.pinnedClients == 1)
        #expect(lb.next(client: bob, now: .seconds(1)) == ep(2))
        // alice's endpoint left: she gets a new one by round robin.
        let alicesNew = lb.next(client: alice, now: .seconds(1))
        #expect(alicesNew == ep(2) || alicesNew == ep(3))
        #expect(lb.next(client: alice, now: .seconds(2)) == alicesNew)
    }

    @Test func unchangedUpdateKeepsTheRoundRobinPosition() {
        var lb = LoadBalancer(endpoints: [ep(1), ep(2), ep(3)])
        _ = lb.next(client: nil, now: .zero)
        lb.update(endpoints: [ep(1), ep(2), ep(3)], affinityTimeout: nil)
        #expect(lb.next(client: nil, now: .zero) == ep(2))
        lb.update(endpoints: [ep(1)], affinityTimeout: nil)
        #expect(lb.next(client: nil, now: .zero) == ep(1))
        lb.update(endpoints: [], affinityTimeout: nil)
        #expect(lb.next(client: nil, now: .zero) == nil)
    }

    @Test func turningAffinityOffForgetsPins() {
        var lb = LoadBalancer(endpoints: [ep(1), ep(2)], affinityTimeout: .seconds(60))
        _ = lb.next(client: alice, now: .zero)
        lb.update(endpoints: [ep(1), ep(2)], affinityTimeout: nil)
        #expect(lb.pinnedClients == 0)
        #expect(lb.next(client: alice, now: .zero) == ep(2))
    }
}
