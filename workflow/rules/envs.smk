# Per-backend venvs, built on the submitting host (a cluster's login node) and keyed by the hash
# of their requirements file: editing workflow/envs/<name>.txt rebuilds that venv and no other.
# `accelerator: cuda` takes workflow/envs/cuda/<name>.txt into .venvs/cuda/ instead.


rule build_env:
    input:
        lambda w: [str(f) for f in dp_envs.requirement_files(w.env, accelerator=ACCELERATOR)],
    output:
        str(dp_envs.venvs_dir(ACCELERATOR) / "{env}-{hash}" / dp_envs.READY),
    log:
        str(dp_envs.PROJECT / f"logs/envs/{ACCELERATOR}/{{env}}-{{hash}}.log"),
    wildcard_constraints:
        env="[a-z][a-z0-9_]*",
        hash="[0-9a-f]{12}",
    localrule: True
    run:
        dp_envs.build(
            wildcards.env, Path(output[0]).parent, log=log[0], accelerator=ACCELERATOR
        )


# A site's own interpreter (config `envs: {<backend>: {python: ...}}`): checked, not built.
rule check_site_env:
    output:
        str(dp_envs.PROJECT / ".venvs/site/{env}-{hash}.json"),
    log:
        str(dp_envs.PROJECT / "logs/envs/site/{env}-{hash}.log"),
    wildcard_constraints:
        env="[a-z][a-z0-9_]*",
        hash="[0-9a-f]{12}",
    localrule: True
    params:
        python=lambda w: SITE_PYTHONS[w.env],
    run:
        found = dp_envs.check_site_python(wildcards.env, params.python, output[0])
        Path(log[0]).write_text(f"{params.python}: {found}\n")


rule envs:
    input:
        all_envs(),
    localrule: True
