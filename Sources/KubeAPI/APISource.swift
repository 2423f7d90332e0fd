// Sluice: a per-node Kubernetes service proxy.
// The Kubernetes API source: informers for Services, EndpointSlices, this node's Node and
// ServiceCIDRs, merged into one event stream with the manifest source's contract: the full
// state, then `.synced` once Services and EndpointSlices have both been listed, then changes.

import Logging
import SluiceCore
import Synchronization

/// Streams the objects a node's proxy needs from the API server.
public final class APISource: Sendable {
    /// The client used (shared with anything else that talks to the same server).
    public let client: KubeClient
    /// This node's name: its Node object is watched for addresses, pod CIDRs and topology labels.
    public let nodeName: String
    /// `--service-proxy-name`: Services labelled for this proxy are served too.
    public let serviceProxyName: String?
    /// Timing and paging.
    public let settings: InformerSettings
    private let logger: Logger
    private let counterBox = CounterBox()
    private let shutsDownClient: Bool

    /// Creates a source. With `shutsDownClient`, the client is shut down when the stream ends.
    public init(client: KubeClient, nodeName: String, serviceProxyName: String? = nil, settings: InformerSettings = .init(),
                logger: Logger, shutsDownClient: Bool = false) {
        self.client = client
        self.nodeName = nodeName
        self.serviceProxyName = serviceProxyName
        self.settings = settings
        self.logger = logger
        self.shutsDownClient = shutsDownClient
    }

    /// What the informers have done so far.
    public var counters: APISourceCounters { counterBox.snapshot }

    /// The label selector for Services and EndpointSlices. Without a proxy name it is
    /// kube-proxy's (`cmd/kube-proxy/app/server.go`: one informer factory for both kinds,
    /// `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`). A selector
    /// cannot say "label absent or equal to NAME", so with a proxy name only headless objects are
    /// excluded by the server and the proxy-name label is checked here.
    public static func labelSelector(serviceProxyName: String?) -> String {
        serviceProxyName == nil
            ? "!\(ServiceLabels.serviceProxyName),!\(ServiceLabels.headless)"
            : "!\(ServiceLabels.headless)"
    }

    /// Whether a Service is this proxy's to serve, by its labels.
    public static func accepts(_ service: Service, serviceProxyName: String?) -> Bool {
        if service.labels[ServiceLabels.headless] != nil { return false }
        guard let owner = service.labels[ServiceLabels.serviceProxyName] else { return true }
        return owner == serviceProxyName
    }

    /// The field selector that picks this node's Node object.
    public var nodeFieldSelector: String { "metadata.name=\(nodeName)" }

    /// Streams events until cancelled: every object, then `.synced` (after Services and
    /// EndpointSlices have each been listed once; the Node may come before or after), then
    /// changes. Never finishes on its own: failures are logged and retried with backoff.
    public func events() -> AsyncThrowingStream<ObjectEvent, Error> {
        let (stream, continuation) = AsyncThrowingStream<ObjectEvent, Error>.makeStream()
        let selector = Self.labelSelector(serviceProxyName: serviceProxyName)
        let proxyName = serviceProxyName
        let gate = SyncGate(required: [KubeResource.services.plural, KubeResource.endpointSlices.plural])
        let informers = [
            Informer(client: client, resource: .services, labelSelector: selector, fieldSelector: nil,
                     accept: { o in
                         if case .service(let s) = o { return APISource.accepts(s, serviceProxyName: proxyName) }
                         return false
                     },
                     settings: settings, counters: counterBox, logger: logger),
            Informer(client: client, resource: .endpointSlices, labelSelector: selector, fieldSelector: nil,
                     accept: { _ in true }, settings: settings, counters: counterBox, logger: logger),
            Informer(client: client, resource: .nodes, labelSelector: nil, fieldSelector: nodeFieldSelector,
                     accept: { [nodeName] o in Informer.key(o)?.name == nodeName }, settings: settings, counters: counterBox,
                     logger: logger),
            // ServiceCIDRs (the nftables mode's cluster-ips-check) do not hold the first sync
            // back, and a server or role without them is not an error, as in kube-proxy.
            Informer(client: client, resource: .serviceCIDRs, labelSelector: nil, fieldSelector: nil,
                     accept: { _ in true }, settings: settings, counters: counterBox, logger: logger, optional: true),
        ]
        let logger = self.logger
        let client = self.client
        let shutdown = shutsDownClient
        logger.info("watching the API server \(client.config.description) for node \(nodeName)")
        let task = Task {
            await withTaskGroup(of: Void.self) { group in
                for informer in informers {
                    group.addTask {
                        await informer.run(emit: { continuation.yield($0) }, listed: {
                            if gate.mark(informer.resource.plural) {
                                logger.info("services and endpointslices listed; the first sync may run")
                                continuation.yield(.synced)
                            }
                        })
                    }
                }
            }
            if shutdown { await client.shutdown() }
            continuation.finish()
        }
        continuation.onTermination = { _ in task.cancel() }
        return stream
    }
}

/// Emits `.synced` once, after every required informer has listed.
final class SyncGate: Sendable {
    private let state: Mutex<(pending: Set<String>, done: Bool)>

    init(required: Set<String>) { state = Mutex((required, false)) }

    /// Marks `name` listed; true exactly once, when the last required one is marked. The
    /// caller yields `.synced` while no other informer can yield in between its own list
    /// events and this mark (each informer emits its list before marking).
    func mark(_ name: String) -> Bool {
        state.withLock { s in
            s.pending.remove(name)
            guard s.pending.isEmpty, !s.done else { return false }
            s.done = true
            return true
        }
    }
}
