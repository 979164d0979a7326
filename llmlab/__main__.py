from llmlab.main import run

run()
