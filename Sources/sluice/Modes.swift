// Sluice: a per-node Kubernetes service proxy.
// Where each proxy mode and each object source plugs into the executable.

import IPTables
import KubeAPI
import Logging
import ServiceLifecycle
import SluiceCore

/// A proxy mode as the executable runs it: its backend, the observers that follow each
/// sync, and any long-running services of its own.
struct ModeRuntime {
    var backend: any ProxyBackend
    var observers: [any SyncObserver] = []
    var services: (SyncRunner<ContinuousClock>) -> [any ServiceLifecycle.Service] = { _ in [] }
}

/// Builds the runtime of the selected `--proxy-mode`.
func makeMode(options: ProxyOptions, node: NodeConfig, logger: Logger) async throws -> ModeRuntime {
    switch options.proxyMode {
    case .iptables:
        let backend: IPTablesBackend
        do {
            backend = try await IPTablesBackend.create(node: node, family: .ipv4, variant: options.iptablesBackend,
                                                       runner: ProcessRunner(), logger: logger)
        } catch {
            throw SluiceExit("cannot use iptables: \(error)")
        }
        return ModeRuntime(backend: backend) { runner in
            [CanaryMonitor(backend: backend, runner: runner, interval: .seconds(5))]
        }
    case .ipvs:
        return try await makeIPVSMode(options: options, node: node, logger: logger)
    case .userspace:
        throw SluiceExit("--proxy-mode \(options.proxyMode.rawValue) is not available yet; use --proxy-mode iptables")
    }
}

/// Builds the object source: a stream of events that starts with the full state, then
/// `.synced`, then changes.
func makeSource(options: ProxyOptions, logger: Logger) throws -> @Sendable () -> AsyncThrowingStream<ObjectEvent, Error> {
    guard let dir = options.manifests else {
        throw SluiceExit("no source of objects: pass --manifests DIR")
    }
    let source = ManifestDirectorySource(directory: dir, logger: logger) { rejection in
        logger.error("\(rejection.description); skipped")
    }
    return { source.events() }
}
