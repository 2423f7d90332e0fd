// The README's flags table is checked against the binary's own --help, so it cannot drift:
// every flag the binary has is in the table and nothing else is, and every default the
// binary prints is the one the table states.

import Foundation
import SluiceTesting
import Testing

/// Flags and defaults from `sluice --help` (ArgumentParser's format).
func helpFlags(_ help: String) -> [String: String?] {
    var out: [String: String?] = [:]
    var current: [String] = []
    var text = ""
    func flush() {
        guard !current.isEmpty else { return }
        var def: String?
        if let r = text.range(of: "(default: ", options: .backwards) {
            def = String(text[r.upperBound...].prefix { $0 != ")" })
        } else if let r = text.range(of: "default: ", options: .backwards), text[r.upperBound...].contains(")") {
            def = String(text[r.upperBound...].prefix { $0 != ")" })
        }
        for f in current { out[f] = def }
        current = []
        text = ""
    }
    var inOptions = false
    for raw in help.split(separator: "\n", omittingEmptySubsequences: false) {
        let line = String(raw)
        if line.hasPrefix("OPTIONS:") { inOptions = true; continue }
        if line.hasPrefix("SUBCOMMANDS:") { flush(); break }
        guard inOptions else { continue }
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        if line.hasPrefix("  -") {
            flush()
            let head = trimmed.split(separator: " ", maxSplits: 1).first.map(String.init) ?? ""
            _ = head
            // "--a, --b <v>  help" or "-v, --v <v>"
            let namesPart = trimmed.components(separatedBy: "  ").first ?? trimmed
            current = namesPart.split(separator: ",").compactMap { part -> String? in
                let name = part.trimmingCharacters(in: .whitespaces).split(separator: " ").first.map(String.init) ?? ""
                return name.hasPrefix("--") ? name : nil
            }
            text = String(trimmed.dropFirst(namesPart.count))
        } else {
            text += " " + trimmed
        }
    }
    flush()
    for skip in ["--help", "--version"] { out[skip] = nil }
    return out
}

@Suite struct ReadmeDriftTests {
    @Test func theFlagsTableMatchesTheBinary() async throws {
        let help = await sluice(["--help"])
        #expect(help.succeeded)
        let flags = helpFlags(help.stdout)
        #expect(flags.count > 20, "\(help.stdout)")
        let root = TestBed.findPackageRoot(from: #filePath) ?? "."
        let readme = try String(contentsOfFile: "\(root)/README.md", encoding: .utf8)
        // Rows of the table under "### Flags": | `--a` / `--b X` | default | meaning |
        var table: [String: String] = [:]
        var inTable = false
        for line in readme.split(separator: "\n").map(String.init) {
            if line.hasPrefix("### Flags") { inTable = true; continue }
            if inTable && line.hasPrefix("#") { break }
            guard inTable, line.hasPrefix("| `") else { continue }
            let cells = line.split(separator: "|", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            guard cells.count >= 4 else { continue }
            for token in cells[1].components(separatedBy: "`").enumerated().filter({ $0.offset % 2 == 1 }).map(\.element) {
                for name in token.split(separator: " ").map(String.init) where name.hasPrefix("--") {
                    table[name.components(separatedBy: "=").first!] = cells[2].replacingOccurrences(of: "`", with: "")
                }
            }
        }
        let missing = Set(flags.keys).subtracting(table.keys)
        let extra = Set(table.keys).subtracting(flags.keys).subtracting(["--help", "--version", "-v"])
        #expect(missing.isEmpty, "flags missing from the README table: \(missing.sorted())")
        #expect(extra.isEmpty, "README table rows for flags the binary does not have: \(extra.sorted())")
        for (flag, def) in flags {
            guard let def, let cell = table[flag] else { continue }
            #expect(cell.contains(def), "README says \(flag) defaults to \"\(cell)\", the binary says \"\(def)\"")
        }
    }
}
