// Sluice: a per-node Kubernetes service proxy.
// Time for the health server: a monotonic reading for timeouts and a wall-clock reading for
// the JSON bodies, printed the way Go's `time.Time.String()` prints them (kube-proxy uses `%q`).

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One reading of a `HealthClock`.
public struct HealthInstant: Sendable, Hashable, Comparable {
    /// Monotonic time since the clock's origin (Go prints it as `m=+<seconds>`).
    public var monotonic: Duration
    /// Wall-clock time since 1970-01-01T00:00:00Z.
    public var wall: Duration

    /// Creates a reading.
    public init(monotonic: Duration, wall: Duration) {
        self.monotonic = monotonic
        self.wall = wall
    }

    public static func < (a: HealthInstant, b: HealthInstant) -> Bool { a.monotonic < b.monotonic }

    /// Go's `time.Time.String()` of this instant in UTC, with the monotonic reading:
    /// `2020-06-03 23:59:53.688063083 +0000 UTC m=+202.631797660`.
    public var goDescription: String {
        let (secs, atto) = wall.components
        let nanos = atto / 1_000_000_000
        var out = GoTime.civil(unixSeconds: secs)
        if nanos > 0 {
            var frac = String(nanos)
            frac = String(repeating: "0", count: 9 - frac.count) + frac
            while frac.hasSuffix("0") { frac.removeLast() }
            out += "." + frac
        }
        out += " +0000 UTC"
        let (mSecs, mAtto) = monotonic.components
        let negative = mSecs < 0 || mAtto < 0
        let mNanos = abs(mSecs) * 1_000_000_000 + abs(mAtto) / 1_000_000_000
        let fracText = String(mNanos % 1_000_000_000)
        out += " m=" + (negative ? "-" : "+") + String(mNanos / 1_000_000_000) + "."
            + String(repeating: "0", count: 9 - fracText.count) + fracText
        return out
    }
}

/// Go's text for times and the zero time.
enum GoTime {
    /// Go's `time.Time{}.String()`: what kube-proxy prints for a time never set.
    static let zero = "0001-01-01 00:00:00 +0000 UTC"

    /// `YYYY-MM-DD HH:MM:SS` in UTC.
    static func civil(unixSeconds: Int64) -> String {
        let days = Int(floorDiv(unixSeconds, 86_400))
        let rem = Int(unixSeconds - Int64(days) * 86_400)
        let (y, m, d) = civilFromDays(days)
        return "\(pad(y, 4))-\(pad(m, 2))-\(pad(d, 2)) \(pad(rem / 3600, 2)):\(pad(rem / 60 % 60, 2)):\(pad(rem % 60, 2))"
    }

    private static func floorDiv(_ a: Int64, _ b: Int64) -> Int64 { a >= 0 ? a / b : -((-a + b - 1) / b) }

    private static func pad(_ v: Int, _ width: Int) -> String {
        let s = String(v)
        return s.count >= width ? s : String(repeating: "0", count: width - s.count) + s
    }

    /// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
    static func civilFromDays(_ z0: Int) -> (Int, Int, Int) {
        let z = z0 + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }
}

/// The real wall clock, since the Unix epoch.
func wallClockNow() -> Duration {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return .seconds(Int64(ts.tv_sec)) + .nanoseconds(Int64(ts.tv_nsec))
}

/// Where the health server's time comes from: injectable, so tests drive it with a manual clock.
public struct HealthClock: Sendable {
    private let monotonic: @Sendable () -> Duration
    private let wall: @Sendable () -> Duration

    /// A clock whose monotonic reading comes from `clock` (measured from now) and whose wall time
    /// is `wallTimeAtStart` plus the same elapsed time. With `ManualClock`, time moves only when
    /// the test advances it.
    public init<C: Clock>(_ clock: C, wallTimeAtStart: Duration) where C.Duration == Duration {
        let origin = clock.now
        monotonic = { origin.duration(to: clock.now) }
        wall = { wallTimeAtStart + origin.duration(to: clock.now) }
    }

    /// The process's clocks: `ContinuousClock` for the monotonic reading, `CLOCK_REALTIME` for
    /// the wall time.
    public static func system() -> HealthClock {
        HealthClock(monotonic: { [origin = ContinuousClock.now] in origin.duration(to: .now) }, wall: { wallClockNow() })
    }

    private init(monotonic: @escaping @Sendable () -> Duration, wall: @escaping @Sendable () -> Duration) {
        self.monotonic = monotonic
        self.wall = wall
    }

    /// Reads the clock.
    public func now() -> HealthInstant { HealthInstant(monotonic: monotonic(), wall: wall()) }
}
