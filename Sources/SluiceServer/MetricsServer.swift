// Sluice: a per-node Kubernetes service proxy.
// The metrics server (kube-proxy's `--metrics-bind-address`, default 127.0.0.1:10249):
// `/metrics` in Prometheus text format, `/proxyMode`, `/configz` and a plain `/healthz`.

import CoreMetrics
import Logging
import Prometheus
import SluiceCore

/// Serves `/metrics`, `/proxyMode`, `/configz` and `/healthz` (a bare `ok`, as kube-proxy's
/// metrics port does).
public enum MetricsServer {
    /// kube-proxy's default address.
    public static let defaultAddress = "127.0.0.1:10249"

    /// The content type of the Prometheus text exposition format.
    public static let metricsContentType = "text/plain; version=0.0.4; charset=utf-8"

    /// Binds `address` and serves until closed.
    /// - Parameters:
    ///   - proxyMode: what `/proxyMode` answers (`iptables`, `ipvs`, ...).
    ///   - configz: the `/configz` body (the effective configuration as JSON, see `configzBody`);
    ///     nil answers 404.
    public static func start(address: BindAddress, metrics: ProxyMetrics, proxyMode: String, configz: String? = nil,
                             logger: Logger) async throws(HTTPServerError) -> HTTPServer {
        let server = try await HTTPServer.start(purpose: "metrics", address: address, logger: logger) { request in
            reply(to: request, metrics: metrics, proxyMode: proxyMode, configz: configz)
        }
        logger.info("serving /metrics, /proxyMode and /configz on \(server.boundAddress)")
        return server
    }

    /// The `/configz` body kube-proxy serves: `{"kubeproxy.config.k8s.io": <configuration>}`,
    /// given the configuration as a JSON object.
    public static func configzBody(configurationJSON: String) -> String {
        "{\"kubeproxy.config.k8s.io\":\(configurationJSON)}"
    }

    /// The answer to one request.
    public static func reply(to request: HTTPRequestInfo, metrics: ProxyMetrics, proxyMode: String,
                             configz: String? = nil) -> HTTPReply {
        switch request.path {
        case "/metrics":
            return HTTPReply(status: 200, headers: [("Content-Type", metricsContentType)], body: metrics.render())
        case "/proxyMode":
            return HTTPReply(status: 200, headers: [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")],
                             body: proxyMode)
        case "/configz":
            guard let configz else { return .notFound }
            return HTTPReply(status: 200, headers: [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")],
                             body: configz)
        case "/healthz":
            return HTTPReply(status: 200, headers: [("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")],
                             body: "ok")
        default:
            return .notFound
        }
    }
}

extension ProxyMetrics {
    /// Makes the swift-metrics facade (`Counter(label:)`, `Timer(label:)`, ...) record into this
    /// registry, so metrics from any module show up on `/metrics`. Call once per process.
    public func bootstrapMetricsSystem() {
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
    }
}
