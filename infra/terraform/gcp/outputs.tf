output "lake_uri" {
  description = "DAG param lake_uri"
  value       = "gs://${google_storage_bucket.this["lake"].name}/lake"
}

output "registry_uri" {
  description = "DAG param registry_uri"
  value       = "gs://${google_storage_bucket.this["registry"].name}/registry"
}

output "runs_uri" {
  description = "DAG param runs_uri"
  value       = "gs://${google_storage_bucket.this["artifacts"].name}/runs"
}

output "releases_uri" {
  description = "Prefix for infra/build.sh --upload (add the version)"
  value       = "gs://${google_storage_bucket.this["artifacts"].name}/releases"
}

output "dataproc_service_account" {
  description = "admm_deploy.dataproc_service_account"
  value       = google_service_account.train.email
}

output "image_repository" {
  description = "Docker repository for infra/docker/dataproc.Dockerfile"
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}
