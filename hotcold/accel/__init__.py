"""Fast hybrid GPU+CPU execution (issue 6): the decode engine, its CPU kernel, dynamic placement, and
`hotcold bench`. See docs/gpu.md. Nothing heavy is imported here."""
