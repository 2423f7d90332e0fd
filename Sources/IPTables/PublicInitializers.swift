// Sluice: a per-node Kubernetes service proxy.
// Public initializers for value types other modes build (the IPVS mode writes its own
// constant-size rule set with the same types).

extension TableBatch {
    /// Creates a table batch from `:CHAIN - [0:0]` lines and rule lines.
    public init(chainLines: [String], ruleLines: [String]) {
        self.init()
        chains = chainLines
        rules = ruleLines
    }
}
