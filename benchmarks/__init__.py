"""What the harness costs, measured as ratios against a baseline timed in the same run: `python -m benchmarks`,
run from a checkout (this folder is not part of the installed cmbench package, and cmbench never imports it).

Each figure is a ratio of two timings taken in one process, interleaved (A B A B …, the order reversed on
every other repeat) and reduced by medians, so it holds on a noisy machine where absolute seconds do not.
One JSON per benchmark goes to `--out` (default results/bench/), each with the date, the machine, torch and
git versions, the command, the raw timings, the repeats, the ratio, its target and whether it was met; the
Markdown table of the run is printed (and written to `table.md` beside them).

    harness_step_{mlp,unet}   cmbench.train.loop.train vs a bare PyTorch loop of the same model, loss object,
                              data sampler, optimizer and EMA update (target ≤ 1.05). Steady state: the time
                              of steps k..K of one run (start-up and the final save excluded), stamped by the
                              loop's on_step hook. The harness runs at the config's checkpoint_every and
                              log_every; checkpoint saves are timed on their own (on_save) and charged at one
                              per checkpoint_every steps.
    sct_vs_ict_{unet,mlp}     harness sCT step vs harness iCT step on the same network (target ≤ 2.0).
    fid_torch_fidelity        cmbench.metrics.evaluate.evaluate_run vs torch_fidelity.calculate_metrics on the
                              same generated and reference images (target ≤ 1.05), cold (no reference
                              statistics cached on either side) and warm (both cached).
    ode_ground_truth          exact PF-ODE map of 10k ring2d points vs scipy solve_ivp called per point.
    eval_every                the toy suite's ring2d runs (seed 0, each variant at its budget) with the suite's
                              evaluate.every vs without: what checkpoint evaluation adds (target ≤ 1.15).
    toy_suite                 `snakemake --cores 2 all` into a fresh results dir (only with --toy-suite).
    gpu_{train,sample,fid,smoke}  the GPU check, its own command: `python -m benchmarks.gpu [--quick]` (module
                              gpu; benchmarks/gpu_run.sh on a bare GPU machine).

Modules: steps (the first two), fid, ode, eval_every, toy_suite, gpu; common (provenance, interleaving, records, the
table); __main__ (the command). Timed assertions belong here, never in the tests.
"""
