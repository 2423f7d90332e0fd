// Sluice: a per-node Kubernetes service proxy.
// Waiting for work that cannot be interrupted, without letting it hold up a shutdown.

import Synchronization

/// Runs `operation` in a task of its own and returns its result; when the calling task is
/// cancelled first, throws `CancellationError` at once and leaves the operation to finish on
/// its own (its result is dropped; it is told of the cancellation).
///
/// For work that cannot stop half way and may take long, but whose result nobody needs once
/// the caller is gone: the running proxy's drift check reads the whole kernel table (at
/// 10 000 Services through libnftables, for tens of seconds), and a graceful shutdown waited
/// for it.
public func abandoningOnCancellation<T: Sendable>(
    _ operation: @escaping @Sendable () async throws -> T
) async throws -> T {
    let outcome = Outcome<T>()
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            let task = Task {
                let result: Result<T, any Error>
                do { result = .success(try await operation()) } catch { result = .failure(error) }
                outcome.resume(with: result)
            }
            outcome.wait(continuation, task: task)
        }
    } onCancel: {
        outcome.resume(with: .failure(CancellationError()))
    }
}

/// The one resumption of ``abandoningOnCancellation(_:)``'s continuation: by the operation's
/// end or by the cancellation, whichever comes first, even before the continuation exists.
private final class Outcome<T: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<T, any Error>?
        var task: Task<Void, Never>?
        var early: Result<T, any Error>?
        var resumed = false
    }
    private let state = Mutex(State())

    func wait(_ continuation: CheckedContinuation<T, any Error>, task: Task<Void, Never>) {
        let early: Result<T, any Error>? = state.withLock { s in
            if let e = s.early {
                s.resumed = true
                return e
            }
            s.continuation = continuation
            s.task = task
            return nil
        }
        if let early {
            if case .failure(let error) = early, error is CancellationError { task.cancel() }
            continuation.resume(with: early)
        }
    }

    func resume(with result: Result<T, any Error>) {
        let (continuation, task): (CheckedContinuation<T, any Error>?, Task<Void, Never>?) = state.withLock { s in
            if s.resumed || s.early != nil { return (nil, nil) }
            guard let c = s.continuation else {
                s.early = result
                return (nil, nil)
            }
            s.resumed = true
            s.continuation = nil
            return (c, s.task)
        }
        if case .failure(let error) = result, error is CancellationError { task?.cancel() }
        continuation?.resume(with: result)
    }
}
