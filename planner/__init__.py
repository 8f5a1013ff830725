"""The planner: specs of the cluster, model and workload, the device catalogue, the cost model
and quality indicator, the HiGHS MILP and its search, the baselines, the simulator and the plan
schema. Pure Python over numpy and highspy: it never imports torch, zmq, the runtime or an
interface library; the runtime reads only ``planner.plan``.
"""
