import Testing
@testable import NFTables

@Suite struct NFTFamilyTests {
    @Test func familyNamesAreNftKeywords() {
        #expect(NFTFamily.ip.rawValue == "ip")
        #expect(NFTFamily.ip6.rawValue == "ip6")
    }
}
