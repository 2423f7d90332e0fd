// Sluice: a per-node Kubernetes service proxy.
// Go-style duration text ("1s", "500ms", "1m30s"), as kube-proxy flags and config use it.

/// Parses and formats Go duration strings.
public enum GoDuration {
    /// Parses `text` such as `30s`, `1m30s`, `250ms`, `2h`; a bare `0` is zero.
    public static func parse(_ text: String) -> Duration? {
        let s = text.trimmingASCIIWhitespace()
        if s == "0" { return .zero }
        guard !s.isEmpty else { return nil }
        var total: Double = 0
        var i = s.startIndex
        var sawUnit = false
        while i < s.endIndex {
            let numStart = i
            while i < s.endIndex, s[i].isNumber || s[i] == "." { i = s.index(after: i) }
            guard numStart < i, let value = Double(s[numStart..<i]) else { return nil }
            let unitStart = i
            while i < s.endIndex, s[i].isLetter || s[i] == "µ" { i = s.index(after: i) }
            let unit = String(s[unitStart..<i])
            let scale: Double
            switch unit {
            case "ns": scale = 1e-9
            case "us", "µs": scale = 1e-6
            case "ms": scale = 1e-3
            case "s": scale = 1
            case "m": scale = 60
            case "h": scale = 3600
            default: return nil
            }
            total += value * scale
            sawUnit = true
        }
        guard sawUnit, total.isFinite, total < 1e9 else { return nil }
        return .nanoseconds(Int64((total * 1e9).rounded()))
    }

    /// Formats like Go's `time.Duration.String` for whole milliseconds and up (`30s`, `1m0s`, `500ms`).
    public static func format(_ d: Duration) -> String {
        let ms = d.components.seconds * 1000 + d.components.attoseconds / 1_000_000_000_000_000
        if ms == 0 { return "0s" }
        if ms < 1000 { return "\(ms)ms" }
        var secs = Double(ms) / 1000
        var out = ""
        let h = Int(secs / 3600)
        if h > 0 { out += "\(h)h"; secs -= Double(h * 3600) }
        let m = Int(secs / 60)
        if h > 0 || m > 0 { out += "\(m)m"; secs -= Double(m * 60) }
        let whole = secs.rounded() == secs
        out += whole ? "\(Int(secs))s" : "\(secs)s"
        return out
    }
}
