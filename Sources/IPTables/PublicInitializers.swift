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

extension JumpRule {
    /// Creates a jump rule `-A <source> [extraArgs] -m comment --comment <comment> -j <target>` in `table`.
    public init(_ table: Table, from source: String, to target: String, comment: String, extraArgs: [String] = []) {
        self.init(table: table, source: source, target: target, comment: comment, extraArgs: extraArgs)
    }
}
