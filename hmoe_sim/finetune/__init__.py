"""Fine-tuning experiments on the HoRA layers of :mod:`hmoe_sim.hora`.

* :mod:`hmoe_sim.finetune.sample_efficiency` -- the toy experiment: students fitted to a
  teacher-adapted random attention layer.
* :mod:`hmoe_sim.finetune.pretrained_experiment` -- the same question on all-MiniLM-L6-v2
  (optional extra ``real``), with its plan (:mod:`~hmoe_sim.finetune.pretrained_plan`),
  optimisers (:mod:`~hmoe_sim.finetune.embedding_fit`) and report
  (:mod:`~hmoe_sim.finetune.pretrained_report`).

These modules may import :mod:`hmoe_sim.hora`; the layers never import the experiments.
"""
