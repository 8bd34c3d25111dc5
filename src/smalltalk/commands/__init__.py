"""The `smalltalk` verbs, one module per stage: each has `register(subparsers)` and its `cmd_*` functions
(cli.py registers them in pipeline order).

  data.py      tokenizer train, data prepare, corpus demo, corpus sft-demo
  routing.py   routers train|compare, partition
  experts.py   experts train|add|remove, dense train, train lm
  evaluate.py  eval (mixture vs dense), eval ppl, eval downstream, report, model info
  sft.py       sft (routed post-training)
  use.py       generate, export, serve
  jobs.py      run, plan, launch, status
  common.py    --config/--set/--run and loading the config they name
"""
