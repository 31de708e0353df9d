"""A KServe Python model server with one model that doubles its FP32 input, started by
test_kserve.py as a separate process:

    python kserve_model.py --grpc-port G --http-port H [--model-name doubler]

Answers on KServe's own v2 gRPC service (``inference.GRPCInferenceService``) on G.
"""

import argparse

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class Doubler(Model):
    """One input of any shape; one output ``output-0``, twice the input, FP32."""

    def __init__(self, name):
        super().__init__(name)
        self.ready = True

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = payload.inputs[0].as_numpy()
        out = InferOutput(name="output-0", shape=list(x.shape), datatype="FP32")
        out.set_data_from_numpy(x * 2)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[out])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--model-name", default="doubler")
    args = parser.parse_args()
    server = ModelServer(grpc_port=args.grpc_port, http_port=args.http_port, enable_grpc=True)
    server.start([Doubler(args.model_name)])


if __name__ == "__main__":
    main()
