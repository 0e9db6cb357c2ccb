import os, sys, time, json
import stageflow
def work(text):
    time.sleep(5)
    return {"n": len(text)}
pipe = stageflow.SequentialPipeline([stageflow.stage(work, writes=["n"])])
recs = [{"id": f"r{i}", "text": "x"*i} for i in range(12)]
if sys.argv[1] == "run":
    print("PID", os.getpid(), flush=True)
    stageflow.run_batch(pipe, recs, journal="/work/verify-s8/j2.sqlite", output="/work/verify-s8/o2.jsonl", backend="processes", concurrency=4, progress=False)
else:
    def work(text): return {"n": len(text)}
    s = stageflow.run_batch(pipe, recs, journal="/work/verify-s8/j2.sqlite", output="/work/verify-s8/o2.jsonl", backend="processes", concurrency=4, progress=False)
    print(s.succeeded, s.ran, s.repeated, s.skipped)
    ids=[json.loads(l)["id"] for l in open("/work/verify-s8/o2.jsonl")]; print("once:", len(ids)==12==len(set(ids)))
