import dspy, stageflow, logging
from stageflow.testing import FakeLM
lm = FakeLM({"answer": "4"}); dspy.configure(lm=lm)
pred = dspy.Predict("question -> answer")
prog = stageflow.SequentialPipeline([stageflow.SequentialPipeline([pred])])
prog(question="warm-up")
pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
trainset = [dspy.Example(question=f"{i}+{i}?", context="math", answer="4").with_inputs("question","context") for i in range(3)]
opt = dspy.BootstrapFewShot(metric=lambda ex, p, trace=None: p.answer == ex.answer, max_bootstrapped_demos=3, max_labeled_demos=0)
c = opt.compile(prog, trainset=trainset)
print({n: len(p.demos) for n,p in c.named_predictors()})
print("LM calls during compile:", [sorted(x[1]) for x in lm.log[1:]])
