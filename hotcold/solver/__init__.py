"""The solver (design.md §4): which FFN neurons live on the GPU, under memory budgets and a cost model.

Library entry points (import them from their modules; this package imports nothing at load time, so
`hotcold --help` stays fast):

    hotcold.solver.solve.solve(profile, hardware, policy=..., gpu_budget=..., ...) -> Placement
    hotcold.solver.placement.Placement            .save(dir) / .load(dir), hot_indices(l), cold_indices(l)
    hotcold.solver.hardware.HardwareSpec, preset(name), calibrate()
    hotcold.solver.costmodel.CostModel, ProfileCosts   (modelled latency of any placement)
    hotcold.solver.report.write_reports(placements, html_path, markdown_path)
    hotcold.memory                                (bytes of every tensor: the one memory account)
"""
