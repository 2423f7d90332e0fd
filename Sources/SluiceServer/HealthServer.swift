// Sluice: a per-node Kubernetes service proxy.
// The proxy health server (kube-proxy's `--healthz-bind-address`, default 0.0.0.0:10256):
// `/healthz` and `/livez`, each counted in `kubeproxy_proxy_{healthz,livez}_total{code}`.

import Logging
import SluiceCore

/// Serves `/healthz` and `/livez` from a `ProxyHealth`.
public enum HealthServer {
    /// kube-proxy's default address.
    public static let defaultAddress = "0.0.0.0:10256"

    /// The headers kube-proxy sets on every health answer.
    static let jsonHeaders: [(name: String, value: String)] = [
        ("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff"),
    ]

    /// Binds `address` and serves until closed.
    /// - Parameter metrics: where to count the answers, when metrics are enabled.
    public static func start(address: BindAddress, health: ProxyHealth, metrics: ProxyMetrics?,
                             logger: Logger) async throws(HTTPServerError) -> HTTPServer {
        let server = try await HTTPServer.start(purpose: "healthz", address: address, logger: logger) { request in
            reply(to: request, health: health, metrics: metrics)
        }
        logger.info("serving /healthz and /livez on \(server.boundAddress)")
        return server
    }

    /// The answer to one request (exposed for tests and for embedding in another server).
    public static func reply(to request: HTTPRequestInfo, health: ProxyHealth, metrics: ProxyMetrics?) -> HTTPReply {
        switch request.path {
        case "/healthz":
            let r = health.healthz()
            metrics?.countHealthz(code: r.status)
            return HTTPReply(status: r.status, headers: jsonHeaders, body: r.body)
        case "/livez":
            let r = health.livez()
            metrics?.countLivez(code: r.status)
            return HTTPReply(status: r.status, headers: jsonHeaders, body: r.body)
        default:
            return .notFound
        }
    }
}
