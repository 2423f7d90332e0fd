// Duration flags are parsed once, as flags (FlagDuration): a bad value is refused naming the
// flag, `--help` shows the default, and the range checks still apply.

import SluiceTesting
import Testing

@Suite struct DurationFlagTests {
    @Test(arguments: [
        (["--sync-period", "bogus"], "--sync-period"),
        (["--min-sync-period", "1"], "--min-sync-period"),
        (["--udp-timeout=-1s"], "--udp-timeout"),
        (["--ipvs-graceful-period", "10 s"], "--ipvs-graceful-period"),
        (["--conntrack-udp-timeout", "5x"], "--conntrack-udp-timeout"),
        (["--drift-check-period", "5"], "--drift-check-period"),
    ])
    func badValuesAreRefusedByFlag(args: [String], flag: String) async {
        let r = await sluice(args + ["--manifests", "/nonexistent"])
        #expect(!r.succeeded)
        #expect(r.stderr.contains("is invalid for '\(flag) <duration>'"), "\(r)")
    }

    @Test func rangeChecksStillApply() async {
        let zero = await sluice(["--sync-period", "0s", "--manifests", "/nonexistent"])
        #expect(!zero.succeeded && zero.stderr.contains("is not a positive duration"), "\(zero)")
        let order = await sluice(["--min-sync-period", "2m", "--sync-period", "1m", "--manifests", "/nonexistent"])
        #expect(!order.succeeded && order.stderr.contains("longer than --sync-period"), "\(order)")
    }

    @Test func helpShowsTheDefaults() async {
        let help = await sluice(["--help"])
        let flat = help.stdout.split(whereSeparator: \.isWhitespace).joined(separator: " ")
        #expect(flat.contains("(Go duration, e.g. 30s). (default: 30s)"))
        #expect(flat.contains("(default: 250ms)"))
        #expect(flat.contains("(default: 24h0m0s)"))
    }
}
