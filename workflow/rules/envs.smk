# Per-backend venvs, built on the submitting host (a cluster's login node) and keyed by the hash
# of their requirements file: editing workflow/envs/<name>.txt rebuilds that venv and no other.


rule build_env:
    input:
        lambda w: [str(f) for f in dp_envs.requirement_files(w.env)],
    output:
        str(dp_envs.PROJECT / ".venvs/{env}-{hash}" / dp_envs.READY),
    log:
        str(dp_envs.PROJECT / "logs/envs/{env}-{hash}.log"),
    wildcard_constraints:
        env="[a-z][a-z0-9_]*",
        hash="[0-9a-f]{12}",
    localrule: True
    run:
        dp_envs.build(wildcards.env, Path(output[0]).parent, log=log[0])


rule envs:
    input:
        all_envs(),
    localrule: True
