"""Command-line recipes shared by the CLI tests."""

# A short run of the demo recipe on a small built-in task: fast steps, real data.
QUICK_TRAIN = ["--gin_file=runs/demo.gin", '--gin.MIXTURE_OR_TASK_NAME="cldr_translate_en_de"',
               '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 16}', "--gin.BATCH_SIZE=4",
               "--gin.TRAIN_STEPS=12", "--gin.CHECKPOINT_PERIOD=2", "--gin.EVAL_PERIOD=0",
               "--gin.WARMUP_STEPS=2", "--gin.TrainConfig.log_period=1",
               "--gin.TrainConfig.progress=False", "--gin.TrainConfig.eval_examples=32"]
