// Control characters from names in files and objects never reach the log raw.

import Logging
import SluiceCore
import SluiceTesting
import Testing

@Suite struct LogEscapingTests {
    @Test func controlCharactersAreWrittenOut() {
        #expect(LogText.escaped("web") == "web")
        #expect(LogText.escaped("wéb-ü") == "wéb-ü")
        #expect(LogText.escaped("a\nERROR forged line") == "a\\nERROR forged line")
        #expect(LogText.escaped("x\u{1b}[31mred") == "x\\u{1b}[31mred")
        #expect(LogText.escaped("a\rb\tc\u{0}d\u{7f}e\u{85}f\u{2028}g") == "a\\rb\\tc\\u{0}d\\u{7f}e\\u{85}f\\u{2028}g")
    }

    @Test func theHandlerEscapesMessagesAndMetadata() {
        let capture = LogCapture()
        let inner = capture.logger()
        var logger = Logger(label: "test") { _ in EscapingLogHandler(inner.handler) }
        logger.logLevel = .info
        logger.error("service ns/\("evil\nINFO sluice: all good") rejected", metadata: ["name": "x\u{1b}]0;pwned\u{7}"])
        #expect(capture.lines.count == 1)
        let line = capture.lines.first ?? ""
        #expect(!line.contains("\n"))
        #expect(line.contains("evil\\nINFO sluice: all good"))
        #expect(line.contains("x\\u{1b}]0;pwned\\u{7}"))
        #expect(!line.unicodeScalars.contains { $0.value < 0x20 })
    }
}
