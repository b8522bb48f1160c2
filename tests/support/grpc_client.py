"""A gRPC client in another language: generates its stubs from proto/ with grpcio-tools
and asks a crm-sync member about a record and its tenants, as any service would.

    python3 grpc_client.py PROTO_DIR ADDR TOKEN TENANT ENTITY KEY

Prints one JSON object: {"status": {...}, "tenants": [...]}. Exits non-zero with the gRPC
status code on stderr when a call fails.
"""

import json
import sys
import tempfile

from grpc_tools import protoc

proto_dir, addr, token, tenant, entity, key = sys.argv[1:7]
out = tempfile.mkdtemp()
if protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                "crmsync/v1/crmsync.proto"]) != 0:
    sys.exit("could not generate stubs from the proto")
sys.path.insert(0, out)

import grpc  # noqa: E402
from crmsync.v1 import crmsync_pb2, crmsync_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel(addr)
auth = [("authorization", f"Bearer {token}")]
try:
    status = crmsync_pb2_grpc.StatusServiceStub(channel).GetRecordStatus(
        crmsync_pb2.GetRecordStatusRequest(tenant=tenant, entity=entity, key=key), metadata=auth)
    tenants = crmsync_pb2_grpc.TenantServiceStub(channel).ListTenants(
        crmsync_pb2.ListTenantsRequest(), metadata=auth)
except grpc.RpcError as e:
    print(e.code().name, file=sys.stderr)
    sys.exit(1)
print(json.dumps({
    "status": {"status": status.status, "version": status.version, "event_id": status.event_id},
    "tenants": [t.name for t in tenants.tenants],
}))
